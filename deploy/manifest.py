"""The per-device rollout manifest: what a device should run, signed.

A manifest names one artifact (content-addressed by sha256) for one device of
one device class, under a per-device monotonic sequence number and an expiry.
Going back to an older model is a *new* manifest with a higher sequence number
that points at the old artifact, so a replayed old manifest is always refused.

Pure Python plus ``cryptography`` (through :mod:`.signing`): the device agent
imports this module.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from edgeslim.components.common import arrays
from edgeslim.components.common.errors import FleetError

from edgeslim.deploy import signing

MANIFEST_TYPE = "edgeslim.fleet.manifest"
MANIFEST_VERSION = 2  # 2: carries the release statement (two roles must agree)
ACTIONS = ("install", "rollback", "withdraw")


class ManifestRejected(FleetError):
    """A device refuses a manifest. ``reason`` is one word, for status and tests."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def artifact_key(sha256: str) -> str:
    """The store key of an artifact: content-addressed, so uploads are idempotent."""
    return f"artifacts/sha256/{sha256}"


def encode_array(array) -> dict[str, Any]:
    """A float32 array as ``{"shape", "dtype", "b64"}`` (:func:`edgeslim.components.common.arrays.encode_array`)."""
    return arrays.encode_array(array)


def decode_array(blob: dict[str, Any]):
    """The inverse of :func:`encode_array`; a malformed array is a malformed manifest."""
    try:
        return arrays.decode_array(blob)
    except arrays.MalformedArray as exc:
        raise ManifestRejected("malformed", str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One file in the store: key, sha256 and size (all three are checked on device).

    The key must be ``artifact_key(sha256)``: anything else is refused as ``malformed``.
    """

    key: str
    sha256: str
    size: int
    format: str = "onnx"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ManifestRejected("malformed", f"artifact sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if not isinstance(self.size, int) or self.size <= 0:
            raise ManifestRejected("malformed", f"artifact size {self.size!r} must be a positive whole number")
        if self.key != artifact_key(self.sha256):
            # Content-addressed only: a signed key like "../../etc/hostname" never reaches a store.
            raise ManifestRejected("malformed", f"artifact key {str(self.key)[:200]!r} is not {artifact_key(self.sha256)!r}: "
                                                "artifacts are stored by their sha256 only")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Artifact | None":
        if d is None:
            return None
        try:
            return cls(key=str(d["key"]), sha256=str(d["sha256"]), size=d["size"],
                       format=str(d.get("format", "onnx")), metadata=dict(d.get("metadata") or {}))
        except (KeyError, TypeError) as exc:
            raise ManifestRejected("malformed", f"artifact entry is missing {exc}") from None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What one device should run. See the module docstring for the rules."""

    fleet: str
    device_id: str
    device_class: str
    rollout_id: str
    sequence: int
    issued_at: float
    expires_at: float
    action: str
    artifact: Artifact | None
    model: dict[str, Any] | None = None
    engine: Artifact | None = None
    health_check: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    release: dict[str, Any] | None = None  # the release statement (an envelope) covering ``artifact``

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ManifestRejected("malformed", f"manifest action {self.action!r}; expected one of {ACTIONS}")
        if not isinstance(self.sequence, int) or self.sequence < 1:
            raise ManifestRejected("malformed", f"manifest sequence {self.sequence!r} must be a whole number >= 1")
        if self.action != "withdraw" and self.artifact is None:
            raise ManifestRejected("malformed", f"an {self.action} manifest needs an artifact")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"type": MANIFEST_TYPE, "version": MANIFEST_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("type") != MANIFEST_TYPE:
            raise ManifestRejected("malformed", f"not an edgeslim manifest (type {d.get('type')!r})")
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestRejected(
                "malformed", f"manifest version {d.get('version')!r}; this agent reads version {MANIFEST_VERSION}"
            )
        try:
            return cls(
                fleet=str(d["fleet"]), device_id=str(d["device_id"]), device_class=str(d["device_class"]),
                rollout_id=str(d["rollout_id"]), sequence=d["sequence"], issued_at=float(d["issued_at"]),
                expires_at=float(d["expires_at"]), action=str(d["action"]),
                artifact=Artifact.from_dict(d.get("artifact")), model=d.get("model"),
                engine=Artifact.from_dict(d.get("engine")), health_check=d.get("health_check"),
                previous=d.get("previous"), release=d.get("release"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestRejected("malformed", f"manifest field missing or wrong: {exc}") from None

    def sign(self, private_key) -> dict[str, Any]:
        """The signed envelope to store at the device's manifest key."""
        return signing.sign(self.to_dict(), private_key)


def manifest_digest(payload: dict[str, Any]) -> str:
    """sha256 of a manifest's signed payload: what a device applied, for matching outcomes."""
    import hashlib

    return hashlib.sha256(signing.canonical_json(payload)).hexdigest()


def verify_manifest(
    envelope: Any,
    root,
    *,
    fleet: str,
    device_id: str,
    device_class: str,
    last_sequence: int,
    now: float | None = None,
) -> Manifest:
    """Check everything a device checks before it downloads a byte.

    Order matters: the fleet role's signature first (nothing unsigned is even parsed),
    then who it is for, then replay and freeze, then the release statement: an install
    or rollback must name exactly the artifact (and engine) that the release role
    signed as gated, and must not outlive that statement.

    Args:
        root: the device's :class:`~edgeslim.deploy.trust.Root`.

    Raises:
        ManifestRejected: with ``reason`` one of ``signature``, ``malformed``,
            ``wrong-device``, ``wrong-class``, ``replay``, ``expired``, ``release``.
    """
    from edgeslim.deploy import trust

    try:
        payload = root.verify(envelope, "fleet", what="manifest")
    except signing.SignatureError as exc:
        raise ManifestRejected("signature", str(exc)) from None
    m = Manifest.from_dict(payload)
    if m.fleet != fleet or m.device_id != device_id:
        raise ManifestRejected(
            "wrong-device", f"manifest is for {m.fleet}/{m.device_id}; this device is {fleet}/{device_id}"
        )
    if m.device_class != device_class:
        raise ManifestRejected(
            "wrong-class",
            f"manifest is for device class {m.device_class!r}; this device is {device_class!r} "
            "(engines are not portable across classes)",
        )
    if m.sequence <= last_sequence:
        raise ManifestRejected(
            "replay", f"manifest sequence {m.sequence} is not above the last applied {last_sequence}: replayed or stale"
        )
    now = time.time() if now is None else now
    if m.expires_at <= now:
        raise ManifestRejected(
            "expired", f"manifest expired {now - m.expires_at:.0f}s ago (at {m.expires_at:.0f}); ask for a fresh one"
        )
    if m.artifact is None:
        return m  # withdraw: nothing is installed, so no release statement is needed
    if m.release is None:
        raise ManifestRejected("release", "manifest carries no release statement: the model was never gated "
                                          "and signed by the release key")
    try:
        rel = trust.verify_release(m.release, root, now=now)
    except signing.SignatureError as exc:
        raise ManifestRejected("release", str(exc)) from None
    if (rel.sha256, rel.size) != (m.artifact.sha256, m.artifact.size):
        raise ManifestRejected("release", f"manifest artifact {m.artifact.sha256[:12]} is not the one the release "
                                          f"statement of {rel.name} version {rel.version} covers ({rel.sha256[:12]})")
    model = m.model or {}
    if (str(model.get("name")), str(model.get("version"))) != (rel.name, rel.version):
        raise ManifestRejected("release", f"manifest names model {model.get('name')} version {model.get('version')}; "
                                          f"its release statement is for {rel.name} version {rel.version}")
    if m.engine is not None:
        want = rel.engines.get(device_class)
        if not want or (want["sha256"], want["size"]) != (m.engine.sha256, m.engine.size):
            raise ManifestRejected("release", f"engine {m.engine.sha256[:12]} for class {device_class} is not in the "
                                              f"release statement of {rel.name} version {rel.version}")
    if m.expires_at > rel.expires_at:
        raise ManifestRejected("release", "manifest outlives its release statement's expiry cap")
    return m
