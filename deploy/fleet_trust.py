"""The fleet's trust as its controller holds it.

The root the controller was provisioned with (and every newer one it leads to in the store),
the fleet (director) key it signs with, bounded reads of untrusted JSON from the store, and
the fleet's short-lived signed timestamp.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.fleet_context import FleetContext, FleetPart

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
        return ts
