"""Promotion after the canary wave: ``auto``, a ``soak``, or an ``approval``; the fleet's policy.

While a promotion waits, the canaries keep reporting: one that fails, stops running this
rollout's model or goes silent counts against ``max_failure_pct`` as in a wave. An approval is
signed by an approver key of the fleet's root (``edgeslim fleet approve`` holds it) and bound to
one generation (its rollout id) and artifact of a rollout; the fleet's policy (may
``follow_alias`` promote on its own?) is signed by the fleet key and carries a version that only
grows, checked against the last one the controller signed (its signed state).
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Any

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy import signing, trust
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_devices import FleetDevices, reported_sha, sequence_number
from edgeslim.deploy.fleet_lock import FleetLock
from edgeslim.deploy.fleet_state import ControllerState, StaleState
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.records import RolloutRecords, over_threshold
from edgeslim.deploy.rollout_config import TERMINAL, WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys, check_name

log = logging.getLogger("edgeslim.controller")

APPROVAL_TYPE = "edgeslim.fleet.approval"
POLICY_TYPE = "edgeslim.fleet.policy"
APPROVER_KEY_ENV = "EDGESLIM_APPROVER_KEY"


def approval_key(keys: FleetKeys, name: str) -> str:
    """Written only by whoever approves a rollout (like the abort request); its controller only reads it."""
    return f"{keys.base}/approvals/{check_name('rollout', name)}.json"


def policy_key(keys: FleetKeys) -> str:
    """The fleet's promotion policy, signed by the fleet key (``edgeslim fleet policy``)."""
    return f"{keys.base}/policy.json"

class Promotion(FleetPart):
    """Approvals, the fleet's signed policy, and the gate between the canary wave and the rest."""

    def __init__(self, ctx: FleetContext, fleet_trust: FleetTrust, records: RolloutRecords,
                 fleet_devices: FleetDevices, lock: FleetLock, state: ControllerState) -> None:
        super().__init__(ctx)
        self.fleet_trust, self.records, self.fleet_devices, self.lock = fleet_trust, records, fleet_devices, lock
        self.state = state
        self._ignored_approvals: set[str] = set()  # etags of approval objects already logged as ignored

    def require_approver(self, approver_key) -> None:
        """Refuse to approve unless ``approver_key`` is an approver key of the current root."""
        if approver_key is None:
            raise ConfigError(f"an approval is signed by an approver key: set {APPROVER_KEY_ENV} or pass "
                              "--approver-key (make one with `edgeslim fleet keygen DIR --role approver`; the "
                              "root lists its public key: --approver-pub)")
        root = self.fleet_trust.root
        kid = signing.key_id(approver_key.public_key())
        if "approver" not in root.roles or kid not in root.roles["approver"].keyids:
            raise ConfigError(f"approver key {kid} is not an approver key of root version {root.version}; use "
                              "one the root lists, or rotate the root to add it (--approver-pub)")

    def approve(self, name: str, by: str | None = None, approver_key=None) -> dict[str, Any]:
        """Approve the promotion of a rollout that is ``awaiting-approval``: write the approval object.

        The approval is signed by ``approver_key`` (an approver key of the fleet's root) and bound to
        this rollout's generation, rollout id and artifact, and to the moment its canary wave ended
        (``canary_done_at``, known only once it has): no approval can be made before the canaries
        reported. It needs no fleet key; whoever can only write the store cannot make one.
        """
        self.require_approver(approver_key)
        rec = self.records.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}; see `edgeslim fleet list`")
        cfg = WaveRolloutConfig.from_dict(rec["config"])
        if rec["state"] in TERMINAL:
            raise FleetError(f"rollout {name!r} is {rec['state']}: nothing to approve")
        if cfg.promote != "approval":
            raise FleetError(f"rollout {name!r} promotes with promote={cfg.promote}, not approval: it waits for "
                             "no approval")
        if rec["state"] != "awaiting-approval":
            raise FleetError(f"rollout {name!r} is {rec['state']}: its canary wave has not finished; approve it "
                             "once `get` shows awaiting-approval")
        if by is None:
            import getpass

            try:
                by = f"{getpass.getuser()}@{socket.gethostname()}"
            except Exception:  # no user name (a container without one)
                by = socket.gethostname()
        body = {"type": APPROVAL_TYPE, "fleet": self.fleet, "rollout": name, "generation": rec.get("generation", 1),
                "rollout_uid": rec.get("rollout_uid"), "artifact_sha256": rec["artifact"]["sha256"],
                "canary_done_at": (rec.get("promotion") or {}).get("since"),
                "model": {k: rec["model"].get(k) for k in ("name", "version")},
                "by": str(by)[:200], "at": self.clock()}
        self.store.put_json(approval_key(self.keys, name), trust.sign_with(body, [approver_key]))
        log.info("rollout %s: approved by %s", name, body["by"])
        rec["approval_requested"] = body  # for the caller's display; the object is the truth
        return rec

    def approval(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """The approval of this generation and artifact of the rollout, if an approver key signed one.

        One not signed by the root's approver role, or one for another rollout, generation, model or
        canary wave (made before it ended), is logged once (one line) and ignored.
        """
        key = approval_key(self.keys, rec["name"])
        try:
            got = self.fleet_trust.read(key, "approval")
            if not got:
                return None
            env, etag = got
            a = self.fleet_trust.root.verify(env, "approver", what=f"approval {key}")
        except (FleetError, ValueError) as exc:
            why = str(exc)
            if why not in self._ignored_approvals:
                self._ignored_approvals.add(why)
                log.error("rollout %s: approval refused: %s; approve with `edgeslim fleet approve %s %s` holding "
                          "an approver key", rec["name"], why[:300], self.fleet, rec["name"])
            return None
        canary_done = (rec.get("promotion") or {}).get("since")
        if canary_done is not None and a.get("canary_done_at") == canary_done and a.get("type") == APPROVAL_TYPE and a.get("fleet") == self.fleet and a.get("rollout") == rec["name"] \
                and a.get("generation") == rec.get("generation", 1) and a.get("rollout_uid") == rec.get("rollout_uid") \
                and a.get("artifact_sha256") == rec["artifact"]["sha256"]:
            at = a.get("at")
            return {"by": str(a.get("by"))[:200],
                    "at": at if isinstance(at, (int, float)) and not isinstance(at, bool) else None}
        if etag not in self._ignored_approvals:
            self._ignored_approvals.add(etag)
            log.warning("rollout %s: approval %s ignored: it is not for generation %s of this rollout, model and "
                        "finished canary wave (approve again with `edgeslim fleet approve %s %s`)", rec["name"], key,
                        rec.get("generation", 1), self.fleet, rec["name"])
        return None

    def _stored_policy_version(self) -> int:
        try:
            got = self.fleet_trust.verified(policy_key(self.keys), "fleet policy")
        except FleetError:
            return 0
        version = (got or ({}, None))[0].get("version")
        return version if isinstance(version, int) and not isinstance(version, bool) else 0

    def set_policy(self, *, auto_promote: bool) -> dict[str, Any]:
        """Sign and store the fleet's promotion policy (the fleet key: a bucket writer cannot turn it on).

        Its version is one above both the stored policy's and the last one recorded in the controller
        state, which records it before the policy is written.
        """
        self.fleet_trust.require_key()
        try:
            seen = self.state.read()["policy_version"]
        except StaleState:
            seen = 0  # recording the version replaces the untrusted state
        version = max(seen, self._stored_policy_version()) + 1
        self.state.record_policy(version)
        pol = {"type": POLICY_TYPE, "fleet": self.fleet, "auto_promote": bool(auto_promote), "version": version,
               "updated_at": self.clock()}
        self.store.put_json(policy_key(self.keys), self.fleet_trust.sign(pol))
        return pol

    def policy(self) -> dict[str, Any]:
        """The fleet's promotion policy as the fleet key signed it; the default (no auto-promotion) otherwise.

        A policy nobody of this fleet signed, one without a version, or one whose version is below the
        last one the controller state records (an old ``auto_promote: true`` put back after it was
        turned off) is logged on one line and ignored.
        """
        default = {"type": POLICY_TYPE, "fleet": self.fleet, "auto_promote": False, "version": None,
                   "updated_at": None}
        key = policy_key(self.keys)
        try:
            got = self.fleet_trust.verified(key, "fleet policy")
            if got is None:
                return default
            pol = got[0]
            if pol.get("type") != POLICY_TYPE or pol.get("fleet") != self.fleet:
                raise FleetError(f"it is a {str(pol.get('type'))[:60]} of fleet {str(pol.get('fleet'))[:60]!r}")
            version = pol.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise FleetError("it carries no version")
            seen = self.state.read()["policy_version"]
            if version < seen:
                raise FleetError(f"it is version {version}, but the controller state records version {seen}: "
                                 "an older policy put back")
            return {**default, **pol, "auto_promote": pol.get("auto_promote") is True}
        except (FleetError, AttributeError, TypeError) as exc:
            log.error("fleet policy %s ignored (%s); no auto-promotion: set it again with "
                      "`edgeslim fleet policy %s --auto-promote true|false`", key, str(exc)[:300], self.fleet)
            return dict(default, ignored=str(exc)[:300])

    def gate(self, rec: dict[str, Any], cfg: WaveRolloutConfig, *,
                        block: bool) -> tuple[str | None, bool]:
        """After the canary wave: ``(abort reason, None)``, or ``(None, promoted?)``.

        ``soak`` waits until ``soak_s`` after the canary wave ended; ``approval`` until
        :meth:`approval` finds this generation approved. Meanwhile abort requests are honoured,
        the canaries are watched (:meth:`_watch_canaries`), and, when ``block``, the lock is
        renewed and the fleet timestamp refreshed as in a wave. Without ``block`` it checks once.
        """
        p = rec.get("promotion")
        if cfg.promote == "auto" or (p or {}).get("passed_at") is not None:
            return None, True
        if not p:
            wave0 = rec["waves"][0]
            since = float(wave0.get("finished_at") or self.clock())
            watch = {}
            for dev in wave0["devices"]:
                d = rec["devices"].get(dev)
                if d and d.get("outcome") == "committed":
                    st = self.fleet_devices.device_status(dev, d["public_key"]) or {}
                    # Silence is counted from now: a gate set up late (a resumed rollout) is not a silence.
                    watch[dev] = {"heartbeat_at": _number(st.get("heartbeat_at")), "seen_at": self.clock()}
            p = rec["promotion"] = {"policy": cfg.promote, "since": since,
                                    "until": since + cfg.soak_s if cfg.promote == "soak" else None,
                                    "approval": None, "passed_at": None, "watch": watch}
        waiting = "soaking" if cfg.promote == "soak" else "awaiting-approval"
        if rec["state"] != waiting:
            rec["state"] = waiting
            self.records.save(rec)
            log.info("rollout %s: canary wave done; %s", rec["name"],
                     f"soaking for {cfg.soak_s:g}s" if waiting == "soaking" else
                     f"awaiting approval (`edgeslim fleet approve {self.fleet} {rec['name']}`)")
        last_renew = self.clock()
        while True:
            requested = self.records.abort_requested(rec)
            if requested:
                rec["abort_requested"] = requested
                return requested, False
            verdict = self._watch_canaries(rec, cfg)
            if verdict:
                return verdict, False
            passed = False
            if cfg.promote == "soak":
                passed = self.clock() >= float(p["until"])
            else:
                approved = self.approval(rec)
                if approved:
                    p["approval"], passed = approved, True
            if passed:
                p["passed_at"] = self.clock()
                rec["state"] = "running"
                self.records.save(rec)
                log.info("rollout %s: promoted (%s)", rec["name"],
                         f"soaked {cfg.soak_s:g}s" if cfg.promote == "soak" else f"approved by {p['approval']['by']}")
                return None, True
            if not block:
                self.records.save(rec)
                return None, False
            if self.clock() - last_renew > cfg.lock_ttl_s / 3:
                self.lock.renew(rec["name"], cfg.lock_ttl_s)
                self.fleet_trust.publish_timestamp()
                self.records.save(rec)
                last_renew = self.clock()
            self.sleep(cfg.poll_interval_s)

    def _watch_canaries(self, rec: dict[str, Any], cfg: WaveRolloutConfig) -> str | None:
        """While a promotion waits, each committed canary must keep saying (signed) that it runs
        this rollout's manifest and model, and keep heartbeating: a new ``heartbeat_at`` at least
        every ``wave_timeout_s`` by this controller's clock. One that does not counts as failed
        (or silent), against ``max_failure_pct`` as in a wave; returns the abort reason, if any."""
        p, now, changed = rec["promotion"], self.clock(), False
        during = "soak" if p["policy"] == "soak" else "wait for approval"
        for dev, w in p["watch"].items():
            d = rec["devices"].get(dev) or {}
            if d.get("outcome") != "committed":
                continue
            st = self.fleet_devices.device_status(dev, d["public_key"])
            bad = None
            if st:
                hb = _number(st.get("heartbeat_at"))
                if hb is not None and (w.get("heartbeat_at") is None or hb > w["heartbeat_at"]):
                    w["heartbeat_at"], w["seen_at"] = hb, now
                bad = _still_ours(st, d["sent"], rec["artifact"]["sha256"])
            if bad:
                d["outcome"], d["reason"] = "failed", f"during the {during}: {bad}"[:500]
            elif now - float(w.get("seen_at") or now) > cfg.wave_timeout_s:
                d["outcome"] = "silent"
                d["reason"] = f"no new status for wave_timeout_s={cfg.wave_timeout_s:g} during the {during}"
            else:
                continue
            changed = True
            log.warning("rollout %s: canary %s %s (%s)", rec["name"], dev, d["outcome"], d["reason"])
        return over_threshold(rec, cfg) if changed else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) else None


def _still_ours(status: dict[str, Any], sent: dict[str, Any], sha256: str) -> str | None:
    """Why a committed device's signed status says it no longer runs this rollout's model; else None."""
    try:
        applied = sequence_number(status.get("applied_sequence"))
        if applied > sent["sequence"]:
            return f"it applied a later manifest (sequence {applied})"
        last = status.get("last") or {}
        if last.get("sequence") == sent["sequence"] and last.get("result") != "committed":
            return f"it reports {str(last.get('result'))[:60]}: {str(last.get('reason'))[:300]}"
        if reported_sha(status) != sha256:
            return "it no longer reports running this rollout's model"
        return None
    except (AttributeError, TypeError) as exc:
        return f"unreadable status ({type(exc).__name__})"
