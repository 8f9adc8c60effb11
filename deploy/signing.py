"""Ed25519 keys and signatures for fleet manifests.

The release side holds the private key (a PEM file readable only by its owner,
or a Kubernetes secret mounted as a file); devices hold only the public key,
shipped with the device image or its provisioning bundle. A signature covers
the canonical JSON of the manifest (sorted keys, no spaces), so the same
manifest always signs to the same bytes.

Imports only ``cryptography``: the device agent uses this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeslim.components.common.errors import ConfigError, FleetError

PRIVATE_KEY_FILE = "fleet-signing.key"
PUBLIC_KEY_FILE = "fleet-signing.pub"


class SignatureError(FleetError):
    """A manifest's signature is missing, malformed or made by an unknown key."""


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (sha256 of its raw bytes, 16 hex)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: str | Path, *, overwrite: bool = False, role: str = "fleet") -> tuple[Path, Path]:
    """Write a new ed25519 key pair into ``directory``.

    The private key is written with mode 0600 and never printed.

    Args:
        directory: where ``fleet-signing.key`` and ``fleet-signing.pub`` go.
        overwrite: replace an existing pair (old devices will then refuse new manifests
            until they get the new public key).
        role: ``fleet`` (``fleet-signing.key``), ``release`` or ``root`` (``ROLE.key``).

    Returns:
        (private key path, public key path).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if role == "fleet":
        priv_path, pub_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    else:
        priv_path, pub_path = directory / f"{role}.key", directory / f"{role}.pub"
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise ConfigError(
            f"{directory}: a signing key already exists; keep it, or pass --overwrite to replace it"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # A new file, 0600 from its creation, renamed over the old key: the key is never readable by
    # others, not even briefly, and an old key file's looser mode (0644, say) does not carry over
    # (O_CREAT keeps an existing file's mode).
    tmp = priv_path.with_name(f".{priv_path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # whatever the umask
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, priv_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the release signing key from a PEM file."""
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(
            f"signing key {path} does not exist; make one with `edgeslim fleet keygen DIR`"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is {type(key).__name__}; expected an ed25519 key")
    return key


def load_public_keys(paths: str | Path | list[str | Path]) -> dict[str, Ed25519PublicKey]:
    """Load one or more trusted public keys (PEM), keyed by key id.

    Several keys let a fleet rotate keys: devices trust old and new for a while.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    keys: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        p = Path(p)
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"public key {p} does not exist; copy fleet-signing.pub to the device") from None
        except ValueError as exc:
            raise ConfigError(f"public key {p} is not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"public key {p} is {type(key).__name__}; expected an ed25519 key")
        keys[key_id(key)] = key
    return keys


def sign(payload: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Wrap ``payload`` in a signed envelope ``{"signed", "signatures"}`` (TUF-like shape)."""
    sig = private_key.sign(canonical_json(payload))
    return {
        "signed": payload,
        "signatures": [
            {"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode()}
        ],
    }


def verify(envelope: Any, trusted: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Return the signed payload if one signature is by a trusted key; else raise.

    Raises:
        SignatureError: the envelope is malformed or no trusted key signed it.
    """
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise SignatureError("manifest is not a signed envelope (no 'signed' object)")
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise SignatureError("manifest carries no signature")
    data = canonical_json(envelope["signed"])
    for entry in sigs:
        if not isinstance(entry, dict):
            continue
        key = trusted.get(str(entry.get("keyid")))
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(str(entry.get("sig", "")), validate=True), data)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"manifest signature by key {entry.get('keyid')} does not verify: forged or altered"
            ) from None
        return envelope["signed"]
    known = ", ".join(sorted(trusted)) or "none"
    raise SignatureError(f"manifest is not signed by a trusted key (trusted: {known})")
