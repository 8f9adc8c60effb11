"""The fleet's root of trust: roles, keys, thresholds, rotation, release statements, timestamps.

TUF's split, sized for one fleet (TUF's root role, and Uptane's image repository +
director split):

- **root** (offline) signs the *root document*: the public keys of every role and how
  many of them must sign (threshold). Devices are provisioned with root version 1; a
  new root ``N+1`` is accepted only when a threshold of root keys of version ``N`` *and*
  of ``N+1`` signed it, so rotation and revocation need no device to be touched by hand.
- **release** signs a *release statement* when a model passes its gate (the register
  step): model name and version, the sha256 and size of its ONNX and of every engine,
  the digest of the gate verdict, and an expiry cap.
- **fleet** (the online director key of the controller) signs per-device manifests, the
  fleet's short-lived *timestamp* and *sequence statement* (TUF's timestamp and snapshot
  roles: the newest manifest sequence of every device, so that a device which lost its
  state still refuses a replayed older manifest), its device *inventory* and the
  controller's own rollout records.

A device installs only what a fleet manifest directs *and* a release statement covers,
both verified against its root. Neither a bucket writer, nor the controller's online
key, nor the webhook pod alone can put an ungated model on a device.

An optional fourth role, **approver** (held by ``edgeslim fleet approve``), signs approvals that
promote a rollout past its canary wave. Devices never read it; a root without it allows no approval.

Imports only ``cryptography`` and the standard library: the device agent uses it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy import bounded
from edgeslim.deploy.signing import SignatureError, canonical_json, key_id

ROLES = ("root", "release", "fleet")
OPTIONAL_ROLES = ("approver",)  # parsed when the root lists them; devices ignore them
ROOT_TYPE = "edgeslim.fleet.root"
RELEASE_TYPE = "edgeslim.release"
TIMESTAMP_TYPE = "edgeslim.fleet.timestamp"
SEQUENCES_TYPE = "edgeslim.fleet.sequences"
INVENTORY_TYPE = "edgeslim.fleet.inventory"
RELEASE_TAG = "edgeslim.release"  # the MLflow model-version tag that carries the statement
DEFAULT_RELEASE_EXPIRY_S = 365 * 24 * 3600.0
MAX_ROOT_STEPS = 64


def public_b64(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw public key, base64: how root documents and registrations carry keys."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(str(text), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError):
        raise SignatureError(f"public key {str(text)[:20]!r}... is not a base64 raw ed25519 key") from None


def sign_with(payload: dict[str, Any], keys: list[Ed25519PrivateKey]) -> dict[str, Any]:
    """A ``{"signed", "signatures"}`` envelope with one signature per key."""
    data = canonical_json(payload)
    return {"signed": payload,
            "signatures": [{"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(data)).decode()}
                           for k in keys]}


def count_signatures(envelope: Any, keys: dict[str, Ed25519PublicKey], *, what: str) -> tuple[dict, int]:
    """The signed payload and how many *distinct* keys of ``keys`` signed it validly."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise SignatureError(f"{what} is not a signed envelope (no 'signed' object)")
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or not sigs or len(sigs) > 64:
        raise SignatureError(f"{what} carries no signature list (or an absurd one)")
    data = canonical_json(envelope["signed"])
    good: set[str] = set()
    for entry in sigs:
        if not isinstance(entry, dict):
            continue
        kid = str(entry.get("keyid"))
        key = keys.get(kid)
        if key is None or kid in good:
            continue
        try:
            key.verify(base64.b64decode(str(entry.get("sig", "")), validate=True), data)
        except (InvalidSignature, ValueError):
            raise SignatureError(f"{what}: the signature by key {kid} does not verify: forged or altered") from None
        good.add(kid)
    return envelope["signed"], len(good)


@dataclasses.dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


class Root:
    """A verified root document. Build the first one with :func:`make_root`."""

    def __init__(self, payload: dict[str, Any]) -> None:
        try:
            if payload.get("type") != ROOT_TYPE:
                raise ValueError(f"type {payload.get('type')!r}")
            self.version = int(payload["version"])
            self.fleet = payload.get("fleet")
            self.keys = {kid: public_from_b64(b64) for kid, b64 in dict(payload["keys"]).items()}
            for kid, key in self.keys.items():
                if key_id(key) != kid:
                    raise ValueError(f"key id {kid} does not name its key")
            self.roles: dict[str, Role] = {}
            for role in ROLES + tuple(r for r in OPTIONAL_ROLES if r in payload["roles"]):
                r = payload["roles"][role]
                ids = tuple(str(k) for k in r["keyids"])
                t = int(r["threshold"])
                if t < 1 or t > len(ids) or any(k not in self.keys for k in ids):
                    raise ValueError(f"role {role}: threshold {t} of {len(ids)} known keys")
                self.roles[role] = Role(ids, t)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SignatureError(f"root document is malformed: {exc}") from None
        self.payload = payload

    def role_keys(self, role: str) -> dict[str, Ed25519PublicKey]:
        return {k: self.keys[k] for k in self.roles[role].keyids}

    def verify(self, envelope: Any, role: str, *, what: str) -> dict[str, Any]:
        """The payload, if at least ``threshold`` keys of ``role`` signed it; else raise."""
        if role not in self.roles:
            raise SignatureError(f"{what}: root version {self.version} lists no {role} key, so nothing signed "
                                 f"by one is accepted; rotate the root to add one (--{role}-pub)")
        payload, n = count_signatures(envelope, self.role_keys(role), what=what)
        need = self.roles[role].threshold
        if n < need:
            raise SignatureError(f"{what} is signed by {n} of the {need} {role} key(s) the root (version "
                                 f"{self.version}) requires: not from this fleet's {role} role")
        return payload

    def successor(self, envelope: Any) -> "Root":
        """Root ``version + 1``, signed by a threshold of this root's root keys and of its own."""
        payload = self.verify(envelope, "root", what=f"root version {self.version + 1}")
        new = Root(payload)
        if new.version != self.version + 1:
            raise SignatureError(f"root document has version {new.version}; expected {self.version + 1}")
        new.verify(envelope, "root", what=f"root version {new.version} (by its own root keys)")
        return new


def make_root(*, root_keys: list, release_keys: list, fleet_keys: list, thresholds: dict[str, int] | None = None,
              version: int = 1, fleet: str | None = None, approver_keys: list | None = None) -> dict[str, Any]:
    """The payload of a root document (sign it with :func:`sign_with` and the root keys).

    ``approver_keys`` (optional): the keys whose signature makes an approval; without them the
    root has no approver role, and no approval is accepted.
    """
    thresholds = thresholds or {}
    keys: dict[str, str] = {}
    roles: dict[str, Any] = {}
    given = [("root", root_keys), ("release", release_keys), ("fleet", fleet_keys)]
    for role, ks in given + ([("approver", approver_keys)] if approver_keys else []):
        if not ks:
            raise ConfigError(f"the root document needs at least one {role} key")
        ids = []
        for k in ks:
            pub = k.public_key() if isinstance(k, Ed25519PrivateKey) else k
            keys[key_id(pub)] = public_b64(pub)
            ids.append(key_id(pub))
        t = int(thresholds.get(role, 1))
        if not 1 <= t <= len(ids):
            raise ConfigError(f"threshold of role {role}: {t}; expected 1..{len(ids)} (the keys it has)")
        roles[role] = {"keyids": sorted(set(ids)), "threshold": t}
    return {"type": ROOT_TYPE, "version": version, "fleet": fleet, "keys": keys, "roles": roles,
            "issued_at": time.time()}


def load_root(path: str | Path) -> tuple[Root, dict[str, Any]]:
    """The root document a device or controller was provisioned with (trusted on first use).

    It must still verify under its own root keys: a file damaged in transit is refused.
    """
    path = Path(path)
    try:
        envelope = bounded.loads(path.read_bytes(), what=f"root document {path}")
    except FileNotFoundError:
        raise ConfigError(f"root document {path} does not exist; make one with `edgeslim fleet root init`") from None
    except bounded.BoundedInputError as exc:
        raise ConfigError(str(exc)) from None
    try:
        root = Root(envelope.get("signed") if isinstance(envelope, dict) else {})
        root.verify(envelope, "root", what=f"root document {path}")
    except SignatureError as exc:
        raise ConfigError(f"{exc}; give the root.json written by `edgeslim fleet root init`") from None
    return root, envelope


def update_root(root: Root, fetch: Callable[[int], Any]) -> tuple[Root, list[dict[str, Any]]]:
    """Walk ``root/N+1``, ``N+2``... as ``fetch(version)`` returns them (``None``: no newer one).

    Returns the newest root reached and the envelopes accepted on the way (to persist).
    Raises SignatureError for a newer root that does not verify (a forged rotation).
    """
    accepted = []
    for _ in range(MAX_ROOT_STEPS):
        envelope = fetch(root.version + 1)
        if envelope is None:
            break
        root = root.successor(envelope)
        accepted.append(envelope)
    return root, accepted


# ------------------------------------------------------------------------ release statements
def gate_digest(gate: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(gate)).hexdigest()


def release_payload(*, name: str, version: str, artifact: dict[str, Any], engines: dict[str, dict[str, Any]],
                    gate: dict[str, Any], run_id: str | None = None,
                    expires_s: float = DEFAULT_RELEASE_EXPIRY_S, now: float | None = None) -> dict[str, Any]:
    """What the release key signs once a model version passed its gate."""
    if not gate.get("passed"):
        raise ConfigError(f"{name} version {version} did not pass its gate ({gate.get('summary', 'no verdict')}); "
                          "a release statement covers only gated models")
    now = time.time() if now is None else now
    return {"type": RELEASE_TYPE, "model": {"name": name, "version": str(version), "run_id": run_id},
            "artifact": {"sha256": artifact["sha256"], "size": int(artifact["size"])},
            "engines": {cls: {"sha256": e["sha256"], "size": int(e["size"])} for cls, e in sorted(engines.items())},
            "gate": {"passed": True, "digest": gate_digest(gate), "summary": str(gate.get("summary", ""))[:300]},
            "issued_at": now, "expires_at": now + float(expires_s)}


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    version: str
    sha256: str
    size: int
    engines: dict[str, dict[str, Any]]
    expires_at: float
    envelope: dict[str, Any]


def verify_release(envelope: Any, root: Root, *, now: float | None = None) -> Release:
    """A release statement verified by the release role, not expired."""
    p = root.verify(envelope, "release", what="release statement")
    try:
        if p.get("type") != RELEASE_TYPE or not p["gate"]["passed"]:
            raise ValueError("not a passed-gate release statement")
        rel = Release(name=str(p["model"]["name"]), version=str(p["model"]["version"]),
                      sha256=str(p["artifact"]["sha256"]), size=int(p["artifact"]["size"]),
                      engines={str(k): {"sha256": str(v["sha256"]), "size": int(v["size"])}
                               for k, v in dict(p.get("engines") or {}).items()},
                      expires_at=float(p["expires_at"]), envelope=envelope)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SignatureError(f"release statement is malformed: {exc}") from None
    now = time.time() if now is None else now
    if rel.expires_at <= now:
        raise SignatureError(f"the release statement of {rel.name} version {rel.version} expired "
                             f"{now - rel.expires_at:.0f}s ago; sign a fresh one with `edgeslim fleet release`")
    return rel


# ------------------------------------------------------------------------ timestamps
def timestamp_payload(*, fleet: str, version: int, root_version: int, ttl_s: float,
                      now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {"type": TIMESTAMP_TYPE, "fleet": fleet, "version": int(version), "root_version": int(root_version),
            "issued_at": now, "expires_at": now + float(ttl_s)}


def verify_timestamp(envelope: Any, root: Root, *, fleet: str) -> dict[str, Any]:
    p = root.verify(envelope, "fleet", what="fleet timestamp")
    if p.get("type") != TIMESTAMP_TYPE or p.get("fleet") != fleet:
        raise SignatureError(f"fleet timestamp is for {p.get('fleet')!r}, not {fleet!r}")
    try:
        int(p["version"]), float(p["issued_at"]), float(p["expires_at"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SignatureError(f"fleet timestamp is malformed: {exc}") from None
    return p


# ------------------------------------------------------------------------ sequence statements
def sequences_payload(*, fleet: str, version: int, root_version: int, sequences: dict[str, int], ttl_s: float,
                      now: float | None = None) -> dict[str, Any]:
    """What the fleet key signs: the newest manifest sequence sent to each device, valid for ``ttl_s``."""
    now = time.time() if now is None else now
    return {"type": SEQUENCES_TYPE, "fleet": fleet, "version": int(version), "root_version": int(root_version),
            "sequences": {str(d): int(n) for d, n in sorted(sequences.items())},
            "issued_at": now, "expires_at": now + float(ttl_s)}


def verify_sequences(envelope: Any, root: Root, *, fleet: str, now: float) -> dict[str, Any]:
    """A sequence statement signed by the fleet role, for ``fleet``, not expired at ``now``."""
    p = root.verify(envelope, "fleet", what="sequence statement")
    if p.get("type") != SEQUENCES_TYPE or p.get("fleet") != fleet:
        raise SignatureError(f"sequence statement is for {p.get('fleet')!r} (type {p.get('type')!r}), not {fleet!r}")
    try:
        expires = float(p["expires_at"])
        seqs = p["sequences"]
        if not isinstance(seqs, dict) or not all(type(n) is int for n in seqs.values()):
            raise ValueError("sequences is not a map of device to whole number")
    except (KeyError, TypeError, ValueError) as exc:
        raise SignatureError(f"sequence statement is malformed: {exc}") from None
    if expires <= now:
        raise SignatureError(f"the sequence statement expired (at {expires:.0f}, by this device's clock): the "
                             "controller re-signs it on every publish (`edgeslim fleet timestamp`)")
    return p


# ------------------------------------------------------------------------ device keys
def load_or_make_device_key(path: str | Path) -> Ed25519PrivateKey:
    """The device's own key, made on first start (mode 0600) and kept across restarts.

    Read without following a link, and only from a regular file of this process's own user: a
    key planted as a link (or by another user) would let whoever planted it speak for the device.
    """
    import errno
    import os
    import stat

    path = Path(path)
    refuse = (f"refused to read device key {path}: it is {{}}; remove it (a new key is made on the next start, "
              "then enrol the device again) and let only the agent's user write the state directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fd = None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(refuse.format(f"a symbolic link to {os.readlink(path)}")) from None
        raise ConfigError(f"cannot read device key {path}: {exc.strerror or exc}") from None
    if fd is not None:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(refuse.format("not a regular file"))
            if st.st_uid != os.geteuid():
                raise ConfigError(refuse.format(f"owned by uid {st.st_uid}, not the agent's uid {os.geteuid()}"))
            pem = fh.read()
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"device key {path} is not an ed25519 key; remove it to make a new one "
                              "(and enrol the device again)")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # whatever sits at the temporary name is removed as it stands (a link as a link), never written through
        if stat.S_ISDIR(os.lstat(tmp).st_mode):
            raise ConfigError(f"{tmp} is a directory; remove it")
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


def verify_device(envelope: Any, public_key_b64: str, *, what: str) -> dict[str, Any]:
    """A payload signed by one device's own key (its status, its registration)."""
    key = public_from_b64(public_key_b64)
    payload, n = count_signatures(envelope, {key_id(key): key}, what=what)
    if n < 1:
        raise SignatureError(f"{what} is not signed by the device's enrolled key")
    return payload
