"""The per-fleet controller lock: one controller acts on a fleet at a time.

Taken with a create-once conditional PUT; a lock that the *store's* clock says was not renewed
for its ``ttl_s`` may be taken over (its controller died), and every renewal is fenced on the
ETag this controller wrote, so a controller whose lock was taken over stops.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from edgeslim.components.common.errors import FleetError
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.rollout_config import MAX_LOCK_TTL_S
from edgeslim.deploy.store import PreconditionFailed

log = logging.getLogger("edgeslim.controller")


class FleetLock(FleetPart):
    """This controller's hold on the fleet lock; ``holder`` names this process in it."""

    def __init__(self, ctx: FleetContext, fleet_trust: FleetTrust) -> None:
        super().__init__(ctx)
        self.fleet_trust = fleet_trust
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._etag: str | None = None

    def acquire(self, rollout: str, ttl_s: float) -> None:
        """Create-once PUT of the fleet lock; take over only one that the *store's* clock says expired."""
        body = {"rollout": rollout, "holder": self.holder, "ttl_s": float(ttl_s)}
        try:
            self._etag = self.store.put_json(self.keys.lock, body, if_none_match_any=True)
            return
        except PreconditionFailed:
            pass
        aged = self.store.age(self.keys.lock)
        if aged is None:  # released between our PUT and this look: try once more
            self._etag = self.store.put_json(self.keys.lock, body, if_none_match_any=True)
            return
        etag, age = aged
        held, held_ttl = self._read(float(ttl_s))
        if age < held_ttl:
            raise FleetError(
                f"fleet {self.fleet!r} is locked by rollout {held.get('rollout')!r} "
                f"(controller {held.get('holder')}, for another {held_ttl - age:.0f}s by the store's clock); "
                "wait for it, or abort it with `edgeslim fleet abort`"
            )
        try:
            self._etag = self.store.put_json(self.keys.lock, body, if_match=etag)
        except PreconditionFailed:
            raise FleetError(f"fleet {self.fleet!r}: another controller took the expired lock first") from None
        log.warning("took over the expired lock of rollout %s", held.get("rollout"))

    def _read(self, ttl_s: float) -> tuple[dict, float]:
        """The lock's body and the ttl it claims (capped; ``ttl_s`` when it says none or is unreadable)."""
        try:
            held = (self.fleet_trust.read(self.keys.lock, "fleet lock") or ({}, ""))[0]
            held = held if isinstance(held, dict) else {}
            return held, min(float(held.get("ttl_s", ttl_s)), MAX_LOCK_TTL_S)
        except (FleetError, TypeError, ValueError):
            return {}, float(ttl_s)

    def held(self) -> dict | None:
        """Who holds the lock now, by the store's clock: ``{"rollout", "holder", "left_s"}``; None when
        it is free or expired (the next controller takes it)."""
        aged = self.store.age(self.keys.lock)
        if aged is None:
            return None
        held, held_ttl = self._read(MAX_LOCK_TTL_S)
        left = held_ttl - aged[1]
        return {"rollout": held.get("rollout"), "holder": held.get("holder"), "left_s": round(left, 1)} \
            if left > 0 else None

    def renew(self, rollout: str, ttl_s: float) -> None:
        """Renew the lock this controller holds; one taken over meanwhile stops it (FleetError)."""
        body = {"rollout": rollout, "holder": self.holder, "ttl_s": float(ttl_s)}
        try:
            self._etag = self.store.put_json(self.keys.lock, body, if_match=self._etag)
        except PreconditionFailed:
            raise FleetError(f"fleet {self.fleet!r}: lost the lock (another controller took it); stopping") from None

    def release(self) -> None:
        """Delete the lock if this controller holds it."""
        try:
            got = self.fleet_trust.read(self.keys.lock, "fleet lock")
        except FleetError:
            got = None
        if got and isinstance(got[0], dict) and got[0].get("holder") == self.holder:
            self.store.delete(self.keys.lock)
        self._etag = None
