"""The controller's own signed state: which rollouts ended, and the last policy version it signed.

Anyone who can write the store can put back an object the fleet key once signed: a rollout
record from before its rollout was aborted, or an auto-promote policy from before it was turned
off. The signature still verifies; only something that remembers the end can tell. The
controller keeps that memory in one object, ``fleets/<F>/controller-state.json``, signed by the
fleet key:

- ``counter``: grows by one with every change. Each controller remembers the highest counter it
  has read and refuses a state with a lower one (an older copy put back), and MLflow's
  end-of-rollout tags carry the counter too (see :mod:`~edgeslim.deploy.registry_sync`).
- ``ended``: every rollout generation that ended, by its rollout id (a random id each
  generation gets when it starts, never reused), with the state it ended in. A rollout record
  whose rollout id is listed here under another state is a replay and is never acted on.
- ``policy_version``: the version of the last auto-promote policy this fleet's controller
  signed; a policy with a lower version is an older one put back.

Writes are compare-and-swap on the object's ETag, so two controllers never lose each other's ends.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from edgeslim.components.common.errors import FleetError
from edgeslim.deploy import bounded, signing
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.store import PreconditionFailed

log = logging.getLogger("edgeslim.controller")

STATE_TYPE = "edgeslim.fleet.controller-state"
MAX_STATE_BYTES = 16 << 20  # ~100 000 ended rollout generations
_WRITE_TRIES = 8


class StaleState(FleetError):
    """The controller state in the store is not one this controller can trust (older, forged, garbled)."""


def _empty() -> dict[str, Any]:
    return {"counter": 0, "ended": {}, "policy_version": 0}


class ControllerState(FleetPart):
    """The fleet's signed, monotonic controller state (see the module docstring)."""

    def __init__(self, ctx: FleetContext, fleet_trust: FleetTrust) -> None:
        super().__init__(ctx)
        self.fleet_trust = fleet_trust
        self.floor = 0  # the highest counter this controller has read or written

    @property
    def key(self) -> str:
        return f"{self.keys.base}/controller-state.json"

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The verified state and its ETag; raises :class:`StaleState` for one this controller must not trust."""
        try:
            got = self.fleet_trust.verified(self.key, "controller state", MAX_STATE_BYTES)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            raise StaleState(f"controller state {self.key} refused: {exc}") from None
        if got is None:
            if self.floor:
                raise StaleState(f"controller state {self.key} is gone, but this controller read counter "
                                 f"{self.floor}: it was deleted")
            return _empty(), None
        st, etag = got
        counter = st.get("counter")
        if st.get("type") != STATE_TYPE or st.get("fleet") != self.fleet or not isinstance(st.get("ended"), dict) \
                or not isinstance(counter, int) or isinstance(counter, bool) \
                or not isinstance(st.get("policy_version"), int):
            raise StaleState(f"controller state {self.key} refused: it is not this fleet's controller state")
        if counter < self.floor:
            raise StaleState(f"controller state {self.key} has counter {counter}, below the {self.floor} this "
                             "controller read: an older copy was put back")
        self.floor = counter
        return st, etag

    def read(self) -> dict[str, Any]:
        """The state (``counter``, ``ended``, ``policy_version``); raises :class:`StaleState`."""
        return self._read()[0]

    def require_floor(self, counter: int, where: str) -> None:
        """Refuse the state from now on unless its counter reaches ``counter`` (read from ``where``)."""
        if counter > self.floor:
            st = self.read()
            if st["counter"] < counter:
                raise StaleState(f"controller state {self.key} has counter {st['counter']}, but {where} "
                                 f"recorded counter {counter}: an older copy was put back")

    def _update(self, change: Callable[[dict[str, Any]], None], why: str) -> dict[str, Any]:
        """Apply ``change`` and write the state with the next counter, compare-and-swap on its ETag.

        A state this controller cannot trust is replaced (logged on one line): ending a rollout
        must never be blocked by a garbled object; the ends it held stay in MLflow's tags.
        """
        for _ in range(_WRITE_TRIES):
            try:
                st, etag = self._read()
            except StaleState as exc:
                log.error("%s; replacing it to record %s", exc, why)
                st, etag = _empty(), (self.store.head(self.key) or (0, None))[1]
            new = {"type": STATE_TYPE, "fleet": self.fleet, "ended": dict(st["ended"]),
                   "policy_version": st["policy_version"], "counter": max(st["counter"], self.floor) + 1,
                   "updated_at": self.clock()}
            change(new)
            envelope = self.fleet_trust.sign(new)
            try:
                if etag is None:
                    self.store.put_json(self.key, envelope, if_none_match_any=True)
                else:
                    self.store.put_json(self.key, envelope, if_match=etag)
            except PreconditionFailed:
                continue  # another controller wrote it meanwhile: read again
            self.floor = new["counter"]
            return new
        raise FleetError(f"controller state {self.key}: still changing under this controller after "
                         f"{_WRITE_TRIES} tries; not recorded: {why}")

    def record_end(self, rec: dict[str, Any]) -> int:
        """Record that this generation of the rollout ended in ``rec['state']``; the new counter."""
        uid = rec["rollout_uid"]

        def change(st):
            st["ended"][uid] = {"rollout": rec["name"], "generation": rec.get("generation", 1),
                                "state": rec["state"], "at": self.clock()}

        return self._update(change, f"the end of rollout {rec['name']} ({rec['state']})")["counter"]

    def record_policy(self, version: int) -> None:
        """Record the version of the policy this controller is about to sign."""
        def change(st):
            st["policy_version"] = max(st["policy_version"], version)

        self._update(change, f"fleet policy version {version}")

    def check_record(self, rec: dict[str, Any], st: dict[str, Any]) -> str | None:
        """Why ``rec`` (a verified rollout record) contradicts the state ``st``: a replay; else None."""
        ended = st["ended"].get(rec.get("rollout_uid"))
        if isinstance(ended, dict) and ended.get("state") != rec.get("state"):
            return (f"the controller state (counter {st['counter']}) records generation {ended.get('generation')} "
                    f"as {ended.get('state')}, but the record says {rec.get('state')}: an older version of "
                    "the record was put back (a replay)")
        return None
