"""Rollout records: one signed JSON object per rollout, rewritten after every step.

A record is read back only if this fleet's key signed it for this fleet and rollout name, and
the controller's signed state (:mod:`~edgeslim.deploy.fleet_state`) does not record its rollout
id as ended otherwise (an older record put back); every write is fenced on the ETag this
controller last saw, so two controllers never both go on. A record that ends is entered in that
state before it is written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy import bounded, signing
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_state import ControllerState, StaleState
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.rollout_config import ACTIVE, TERMINAL, WaveRolloutConfig
from edgeslim.deploy.store import PreconditionFailed

log = logging.getLogger("edgeslim.controller")

MAX_RECORD_BYTES = bounded.MAX_MANIFEST_BYTES + (8 << 20)
# How long a record behind the controller state is read again before it counts as put back: far above
# the one write that separates them, on a loaded machine too.
SETTLE_S = 10.0


class UntrustedRecord(FleetError):
    """A rollout record in the store that this fleet's key did not sign: never acted on."""


class RolloutRecords(FleetPart):
    """The fleet's rollout records, as its fleet key signed them."""

    def __init__(self, ctx: FleetContext, fleet_trust: FleetTrust, state: ControllerState) -> None:
        super().__init__(ctx)
        self.fleet_trust, self.state = fleet_trust, state
        self._etags: dict[str, str | None] = {}
        self.untrusted: list[str] = []  # record keys found planted, altered or replayed (list, reconcile)
        self._behind: set[tuple[str, str | None]] = set()  # (key, ETag) of records found put back

    def get(self, name: str, state: dict[str, Any] | None = None, *, stale_ok: bool = False,
            settle_by: float | None = None) -> dict[str, Any] | None:
        """The rollout record, verified; raises :class:`UntrustedRecord` for a planted, altered or replayed one.

        ``state``: the controller state to check it against (read here when not given). An active
        record is not returned while that state cannot be trusted, unless ``stale_ok`` (an abort: it
        only ever moves devices back to gated models they ran, so a garbled state must not stop it).

        A controller enters an ending rollout in its state and then writes the record, so a read
        between the two writes finds the record one step behind the state, as a replay would. Such a
        record is read again (state too) until ``settle_by`` (``SETTLE_S`` seconds from the first
        contradiction when not given): the controller's record catches up with its next write, a record
        put back stays behind and is refused, at once whenever the same object is read again.
        """
        key = self.keys.rollout(name)
        while True:
            rec, etag, why = self._read(name, state, stale_ok)
            if not why:
                break
            now = time.monotonic()
            settle_by = settle_by if settle_by is not None else now + SETTLE_S
            if now >= settle_by or (key, etag) in self._behind:
                if len(self._behind) >= 4096:  # a store rewritten with ever new replays: forget, never grow
                    self._behind.clear()
                self._behind.add((key, etag))
                raise UntrustedRecord(f"rollout record {key} not acted on: {why}; delete it")
            time.sleep(0.2)
            state = None
        if rec is None:
            return None
        self._etags[name] = etag
        return rec

    def _read(self, name: str, state: dict[str, Any] | None,
              stale_ok: bool) -> tuple[dict[str, Any] | None, str | None, str | None]:
        """(record, its ETag, why it contradicts the controller state or None); raises for a record
        this fleet did not sign, or an active one while the state cannot be trusted."""
        key = self.keys.rollout(name)
        try:
            got = self.fleet_trust.verified(key, f"rollout record {name!r}", MAX_RECORD_BYTES)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            raise UntrustedRecord(f"{exc}; the record was planted or altered in the store, so it is never acted "
                                  f"on: delete {key}") from None
        if got is None:
            return None, None, None
        rec, etag = got
        if rec.get("name") != name or rec.get("fleet") != self.fleet:
            raise UntrustedRecord(f"rollout record {key} is signed for {rec.get('fleet')}/{rec.get('name')}: "
                                  "copied from elsewhere; delete it")
        try:
            why = self.state.check_record(rec, state or self.state.read())
        except StaleState as exc:
            if rec.get("state") in ACTIVE and not stale_ok:
                raise UntrustedRecord(f"rollout record {key} not acted on: {exc}; the fleet's controller state "
                                      "must be restored (or deleted, leaving MLflow's tags as the record)") from None
            why = None  # an ended record only shows
        return rec, etag, why

    def list(self) -> list[dict[str, Any]]:
        """Every record this fleet signed; the others are logged and counted in ``self.untrusted``."""
        out = []
        self.untrusted = []
        try:
            state = self.state.read()
        except StaleState:
            state = None  # each get() says so for an active record
        settle_by = time.monotonic() + SETTLE_S  # one wait for the whole listing, however many records are behind
        for key in self.store.list(self.keys.rollouts_prefix):
            if key.endswith(".json"):
                try:  # the whole rest of the key: rollouts/sub/r1.json is not r1 (check_name refuses it)
                    rec = self.get(key[len(self.keys.rollouts_prefix):-len(".json")], state, settle_by=settle_by)
                except FleetError as exc:
                    log.error("%s", exc)
                    self.untrusted.append(key)
                    continue
                except ConfigError as exc:  # a planted key that names no rollout must not stop the others
                    log.error("%s: %s; not a rollout record, never acted on: delete it", key, exc)
                    self.untrusted.append(key)
                    continue
                if rec:
                    out.append(rec)
        return out

    def abort_requested(self, rec: dict[str, Any]) -> str | None:
        """The reason of a pending abort request for this generation of the rollout, if any.

        Anyone who can write the store can ask for an abort: that only ever moves devices back
        to gated models they ran before, so an unreadable request counts as one.
        """
        try:
            got = self.fleet_trust.read(self.keys.abort_request(rec["name"]), "abort request")
        except FleetError as exc:
            return f"aborted by an unreadable request ({exc})"
        if not got:
            return None
        req = got[0] if isinstance(got[0], dict) else {}
        if req.get("generation", 1) != rec.get("generation", 1):
            return None  # left over from an earlier generation under this name
        return str(req.get("reason") or "aborted by request")[:500]

    def save(self, rec: dict[str, Any]) -> None:
        """Sign and write the record, fenced on the ETag this controller last saw; a record that ended
        is entered in the controller state first."""
        if rec.get("state") in TERMINAL and isinstance(rec.get("rollout_uid"), str):
            try:
                known = (self.state.read()["ended"].get(rec["rollout_uid"]) or {}).get("state")
            except StaleState:
                known = None
            if known != rec["state"]:
                rec["state_counter"] = self.state.record_end(rec)
        rec["updated_at"] = self.clock()
        name, key = rec["name"], self.keys.rollout(rec["name"])
        etag = self._etags.get(name)
        try:
            if etag is None:
                new = self.store.put_json(key, self.fleet_trust.sign(rec), if_none_match_any=True)
            else:
                new = self.store.put_json(key, self.fleet_trust.sign(rec), if_match=etag)
        except PreconditionFailed:
            raise FleetError(f"rollout {name!r}: its record changed under this controller (another controller, "
                             "or a write to the store); stopping without touching devices further") from None
        self._etags[name] = new


def tally(rec: dict[str, Any]) -> tuple[int, int]:
    """``(reported, failed)``: devices with an outcome, and those of them that failed, were rejected or went silent."""
    outs = [d["outcome"] for d in rec["devices"].values() if d["outcome"]]
    failed = sum(o in ("failed", "rejected", "silent") for o in outs)
    return len(outs), failed


def over_threshold(rec: dict[str, Any], cfg: WaveRolloutConfig) -> str | None:
    """Why the rollout must abort: more than ``max_failure_pct`` of at least ``min_reported`` failed."""
    reported, failed = tally(rec)
    if reported >= cfg.min_reported and failed * 100.0 / max(reported, 1) > cfg.max_failure_pct:
        return (f"{failed} of {reported} reported devices failed "
                f"({failed * 100.0 / reported:.0f}% > max_failure_pct {cfg.max_failure_pct:g})")
    return None
