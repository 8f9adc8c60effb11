"""The fleet's trust as its controller holds it.

The root the controller was provisioned with (and every newer one it leads to in the store),
the fleet (director) key it signs with, bounded reads of untrusted JSON from the store, and
the fleet's short-lived signed timestamp and sequence statement (each device's newest manifest
sequence, so that a device which lost its state still refuses a replayed older manifest).
"""

from __future__ import annotations

import logging
from typing import Any

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.store import PreconditionFailed

log = logging.getLogger("edgeslim.controller")

ROOT_ENV = "EDGESLIM_FLEET_ROOT"
DEFAULT_TIMESTAMP_TTL_S = 24 * 3600.0


class FleetTrust(FleetPart):
    """What the controller verifies against and signs with.

    Args:
        ctx: the fleet and store.
        signing_key: the fleet (director) ed25519 private key (needed to write anything).
        root: the fleet's :class:`~edgeslim.deploy.trust.Root` (as provisioned; newer
            versions published in the store are followed).
        timestamp_ttl_s: how long a published fleet timestamp stays valid.
    """

    def __init__(self, ctx: FleetContext, *, signing_key=None, root=None,
                 timestamp_ttl_s: float = DEFAULT_TIMESTAMP_TTL_S) -> None:
        super().__init__(ctx)
        self.signing_key = signing_key
        self._root, self._root_followed = root, False
        self.timestamp_ttl_s = timestamp_ttl_s
        self._sent: dict[str, int] = {}  # manifest sequences this controller wrote, for the next statement

    @property
    def root(self):
        """The newest root the provisioned one leads to (walked once per controller)."""
        if self._root is None:
            raise ConfigError("the fleet's root document is needed: pass --root root.json or set "
                              f"{ROOT_ENV} (make it with `edgeslim fleet root init`)")
        if not self._root_followed:
            self._root_followed = True
            for _ in range(trust.MAX_ROOT_STEPS):  # one version at a time: a bad one stops the walk, not us
                try:
                    envelope = self._fetch_root(self._root.version + 1)
                    if envelope is None:
                        break
                    self._root = self._root.successor(envelope)
                except FleetError as exc:
                    log.error("refused root version %d: %s; keeping version %d", self._root.version + 1, exc,
                              self._root.version)
                    break
        return self._root

    def _fetch_root(self, version: int) -> Any:
        blob = self.store.get(self.keys.root(version), max_bytes=bounded.MAX_SMALL_BYTES)
        return None if blob is None else bounded.loads(blob.data, what=f"root version {version}")

    def require_key(self) -> None:
        """Refuse to write unless the signing key is a fleet key of the current root."""
        if self.signing_key is None:
            raise ConfigError("a fleet signing key is needed to roll out; set EDGESLIM_FLEET_SIGNING_KEY "
                              "or pass --signing-key (make one with `edgeslim fleet keygen --role fleet`)")
        kid = signing.key_id(self.signing_key.public_key())
        if kid not in self.root.roles["fleet"].keyids:
            raise ConfigError(f"signing key {kid} is not a fleet key of root version {self.root.version}; "
                              "use the fleet key the root lists, or rotate the root to add it")

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` in an envelope signed by the fleet key."""
        return trust.sign_with(payload, [self.signing_key])

    def read(self, key: str, what: str, max_bytes: int = bounded.MAX_SMALL_BYTES) -> tuple[Any, str] | None:
        """Bounded read of one untrusted JSON object (size checked before the body is read)."""
        blob = self.store.get(key, max_bytes=max_bytes)
        if blob is None:
            return None
        return bounded.loads(blob.data, what=what, max_bytes=max_bytes), blob.etag

    def verified(self, key: str, what: str, max_bytes: int = bounded.MAX_SMALL_BYTES) -> tuple[Any, str] | None:
        """An object the fleet key signed, with its etag; raises SignatureError if it is not."""
        got = self.read(key, what, max_bytes)
        if got is None:
            return None
        return self.root.verify(got[0], "fleet", what=what), got[1]

    def publish_timestamp(self) -> dict[str, Any]:
        """A fresh, short-lived signed timestamp: devices report metadata older than it as stale."""
        self.require_key()
        version = int(self.clock())
        try:
            got = self.verified(self.keys.timestamp, "fleet timestamp")
            if got:
                version = max(version, int(got[0].get("version", 0)) + 1)
        except (FleetError, TypeError, ValueError) as exc:
            log.warning("replacing an unreadable fleet timestamp (%s)", exc)
        ts = trust.timestamp_payload(fleet=self.fleet, version=version, root_version=self.root.version,
                                     ttl_s=self.timestamp_ttl_s, now=self.clock())
        self.store.put_json(self.keys.timestamp, self.sign(ts))
        self.publish_sequences()
        return ts

    def note_sequence(self, device: str, sequence: int) -> None:
        """A manifest with ``sequence`` was written for ``device``: the next sequence statement names it."""
        self._sent[device] = max(sequence, self._sent.get(device, 0))

    def _manifest_sequences(self) -> dict[str, int]:
        """Each device's manifest sequence, read from the store (to rebuild a statement that is gone)."""
        out: dict[str, int] = {}
        for key in self.store.list(self.keys.devices_prefix):
            if not key.endswith("/manifest.json"):
                continue
            device = key[len(self.keys.devices_prefix):].split("/", 1)[0]
            try:
                got = self.verified(key, f"manifest of {device}", max_bytes=bounded.MAX_MANIFEST_BYTES)
                seq = got[0].get("sequence") if got else None
            except (FleetError, TypeError, ValueError, AttributeError):
                continue  # not this fleet's: it names no sequence
            if type(seq) is int:
                out[device] = seq
        return out

    def publish_sequences(self) -> dict[str, Any]:
        """Re-sign the fleet's sequence statement, short-lived like the timestamp: the sequence of the
        newest manifest sent to each device, never lower than the last statement said. A device with
        no replay floor of its own (new, or its state lost) refuses any manifest below it.

        Rebuilt from the manifests in the store when it is missing or not this fleet's.
        """
        self.require_key()
        for _ in range(3):
            seqs, version, etag = {}, int(self.clock()), None
            try:
                got = self.verified(self.keys.sequences, "sequence statement", max_bytes=bounded.MAX_MANIFEST_BYTES)
            except (FleetError, TypeError, ValueError) as exc:
                log.warning("rebuilding an unreadable sequence statement from the manifests (%s)", exc)
                got = None
                etag = (self.store.head(self.keys.sequences) or (0, None))[1]
            if got and isinstance(got[0].get("sequences"), dict):
                etag = got[1]
                version = max(version, int(got[0].get("version", 0)) + 1)
                seqs = {str(d): n for d, n in got[0]["sequences"].items() if type(n) is int}
            else:
                seqs = self._manifest_sequences()
            for d, n in self._sent.items():
                seqs[d] = max(n, seqs.get(d, 0))
            st = trust.sequences_payload(fleet=self.fleet, version=version, root_version=self.root.version,
                                         sequences=seqs, ttl_s=self.timestamp_ttl_s, now=self.clock())
            try:
                if etag is None:
                    self.store.put_json(self.keys.sequences, self.sign(st), if_none_match_any=True)
                else:
                    self.store.put_json(self.keys.sequences, self.sign(st), if_match=etag)
            except PreconditionFailed:
                continue  # another controller wrote it meanwhile: merge with theirs
            return st
        raise FleetError("the fleet's sequence statement kept changing while this controller wrote it; "
                         "run it again (`edgeslim fleet timestamp`)")
