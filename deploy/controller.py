"""The rollout controller: alias in MLflow -> signed manifests in waves -> aliases moved.

One rollout (an ``mlflow deployments`` deployment of target ``edge:/FLEET``)
is a record in the fleet store. The controller:

1. resolves ``models:/NAME@ALIAS`` (or ``/VERSION``) in MLflow and uploads the
   edge model's ONNX (and any engines per device class) content-addressed;
2. takes the per-fleet lock with a create-once conditional PUT;
3. writes signed manifests wave by wave (canary first), each device's sequence
   number one above anything it has seen;
4. waits for each wave's statuses with a timeout, a silent device counting as
   failed, and aborts once ``min_reported`` devices have reported and the failure
   share is above ``max_failure_pct``: every device it touched then gets a new,
   higher-sequence manifest back to its previous artifact;
5. moves ``edge-canary`` after the canary wave (the version it pointed at is kept in the
   record, and put back if the rollout aborts), then promotes as ``-C promote=`` says:
   ``auto`` goes on at once, ``soak`` waits ``soak_s`` while the canaries keep reporting, and
   ``approval`` waits (``awaiting-approval``) for an approval object (``edgeslim fleet approve``);
6. on success moves ``edge-stable`` and tags the model version.

The rollout record is rewritten after every step, so ``get`` shows progress and
``reconcile`` (a Kubernetes CronJob) can resume a rollout whose controller died. Each
generation of a rollout gets a random rollout id when it starts; once it ends, it stays ended:
the controller's signed state (:mod:`~edgeslim.deploy.fleet_state`) and MLflow's tags record the
end by that id, and a rollout is resumed only when both are read and neither records it.

The controller is a coordinator over one part per concern, all sharing one
:class:`~edgeslim.deploy.fleet_context.FleetContext`: trust (:mod:`~edgeslim.deploy.fleet_trust`),
the fleet lock (:mod:`~edgeslim.deploy.fleet_lock`), rollout records (:mod:`~edgeslim.deploy.records`),
devices (:mod:`~edgeslim.deploy.fleet_devices`), release targets and the golden health check
(:mod:`~edgeslim.deploy.targets`, :mod:`~edgeslim.deploy.golden`), promotion
(:mod:`~edgeslim.deploy.promotion`), the waves (:mod:`~edgeslim.deploy.waves`) and the MLflow
registry (:mod:`~edgeslim.deploy.registry_sync`). This module starts, updates, aborts, withdraws
and reconciles rollouts; the names it exports are the rollouts' public API.
MLflow is imported only inside the functions that need it.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from edgeslim.components.common.errors import FleetError
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_devices import FleetDevices
from edgeslim.deploy.fleet_lock import FleetLock
from edgeslim.deploy.fleet_state import ControllerState, StaleState
from edgeslim.deploy.fleet_trust import DEFAULT_TIMESTAMP_TTL_S, FleetTrust
from edgeslim.deploy.golden import golden_check
from edgeslim.deploy.promotion import Promotion, approval_key, policy_key
from edgeslim.deploy.records import RolloutRecords, UntrustedRecord, tally
from edgeslim.deploy.registry_sync import ModelRef, RegistrySync, RegistryUnavailable, resolve_model
from edgeslim.deploy.rollout_config import ACTIVE, TERMINAL, WaveRolloutConfig
from edgeslim.deploy.store import ObjectStore
from edgeslim.deploy.targets import ReleaseTargets
from edgeslim.deploy.waves import WaveRunner, wave_plan

__all__ = ["ACTIVE", "Controller", "ModelRef", "UntrustedRecord", "WaveRolloutConfig", "approval_key",
           "approved_next", "fleet_summary", "follow_alias", "golden_check", "policy_key", "resolve_model", "wave_plan"]

log = logging.getLogger("edgeslim.controller")


class Controller(FleetPart):
    """Rollouts of one fleet.

    Nothing in the store is trusted unless this fleet's root vouches for it: rollout
    records and rollback targets carry the fleet key's signature, device statuses the
    device's own enrolled key, and a model is rolled out only under the release
    statement that the register step signed when it passed its gate.

    Args:
        store: the fleet store.
        fleet: fleet name (``edge:/FLEET``).
        signing_key: the fleet (director) ed25519 private key (needed to write anything).
        root: the fleet's :class:`~edgeslim.deploy.trust.Root` (as provisioned; newer
            versions published in the store are followed).
        clock, sleep: injectable for unit tests of the wave logic; every part reads them from
            ``ctx`` (a :class:`~edgeslim.deploy.fleet_context.FleetContext`), where a test may swap them.
    """

    def __init__(self, store: ObjectStore, fleet: str, *, signing_key=None, root=None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 timestamp_ttl_s: float = DEFAULT_TIMESTAMP_TTL_S) -> None:
        super().__init__(FleetContext(store, fleet, clock, sleep))
        ctx = self.ctx
        self.fleet_trust = FleetTrust(ctx, signing_key=signing_key, root=root, timestamp_ttl_s=timestamp_ttl_s)
        self.lock = FleetLock(ctx, self.fleet_trust)
        self.state = ControllerState(ctx, self.fleet_trust)
        self.records = RolloutRecords(ctx, self.fleet_trust, self.state)
        self.fleet_devices = FleetDevices(ctx, self.fleet_trust)
        self.targets = ReleaseTargets(ctx, self.fleet_trust)
        self.registry = RegistrySync(ctx, self.records)
        self.promotion = Promotion(ctx, self.fleet_trust, self.records, self.fleet_devices, self.lock, self.state)
        self.unchecked: list[str] = []  # rollouts the last reconcile left alone: their end could not be checked
        self.waves = WaveRunner(ctx, fleet_trust=self.fleet_trust, records=self.records,
                                fleet_devices=self.fleet_devices, lock=self.lock, targets=self.targets,
                                promotion=self.promotion, registry=self.registry)

    # ------------------------------------------------------------------ the parts, as the CLI and plugin use them
    @property
    def root(self):
        """The newest root the provisioned one leads to."""
        return self.fleet_trust.root

    @property
    def holder(self) -> str:
        """This controller's name in the fleet lock."""
        return self.lock.holder

    @property
    def untrusted(self) -> list[str]:
        """Record keys found planted, altered or replayed by the last ``list`` or ``reconcile``."""
        return self.records.untrusted

    def publish_timestamp(self) -> dict[str, Any]:
        return self.fleet_trust.publish_timestamp()

    def acquire_lock(self, rollout: str, ttl_s: float) -> None:
        self.lock.acquire(rollout, ttl_s)

    def renew_lock(self, rollout: str, ttl_s: float) -> None:
        self.lock.renew(rollout, ttl_s)

    def release_lock(self) -> None:
        self.lock.release()

    def get(self, name: str) -> dict[str, Any] | None:
        return self.records.get(name)

    def list(self) -> list[dict[str, Any]]:
        return self.records.list()

    def approve(self, name: str, by: str | None = None, approver_key=None) -> dict[str, Any]:
        return self.promotion.approve(name, by, approver_key)

    def set_policy(self, *, auto_promote: bool) -> dict[str, Any]:
        return self.promotion.set_policy(auto_promote=auto_promote)

    def policy(self) -> dict[str, Any]:
        return self.promotion.policy()

    def enrol(self, device_id: str, device_class: str | None = None, public_key: str | None = None) -> dict[str, Any]:
        return self.fleet_devices.enrol(device_id, device_class, public_key)

    def enrol_many(self, entries: dict[str, tuple[str, str]]) -> None:
        self.fleet_devices.enrol_many(entries)

    def registrations(self) -> dict[str, dict[str, Any]]:
        return self.fleet_devices.registrations()

    def devices(self) -> dict[str, dict[str, Any]]:
        return self.fleet_devices.devices()

    def pending(self) -> dict[str, dict[str, Any]]:
        return self.fleet_devices.pending()

    def put_target(self, target: dict[str, Any]) -> dict[str, Any]:
        return self.targets.put_target(target)

    # ------------------------------------------------------------------ rollouts
    def _active_rollouts(self, except_name: str | None = None) -> list[str]:
        return [r["name"] for r in self.list() if r.get("state") in ACTIVE and r["name"] != except_name]

    def create(self, name: str, model_uri: str, cfg: WaveRolloutConfig, *, wait: bool = True,
               block: bool | None = None) -> dict[str, Any]:
        """Start a rollout. ``wait``: run it to the end here; else leave it for ``reconcile``.

        ``block`` (default ``wait``): also wait here through a soak or for an approval; ``False``
        runs the waves but leaves a rollout that reaches its promotion ``soaking`` or
        ``awaiting-approval`` for ``reconcile``.
        """
        self.fleet_trust.require_key()
        existing = self.get(name)
        if existing and existing.get("state") not in TERMINAL:
            raise FleetError(f"rollout {name!r} already exists and is {existing['state']}; "
                             "use update, or delete it first")
        if existing:
            raise FleetError(f"rollout {name!r} already exists ({existing['state']}); use `update` "
                             "to roll out another version under this name")
        return self._start(name, model_uri, cfg, wait=wait, block=block, history=[])

    def _start(self, name: str, model_uri: str, cfg: WaveRolloutConfig, *, wait: bool,
               history: list, generation: int = 1, block: bool | None = None) -> dict[str, Any]:
        self.acquire_lock(name, cfg.lock_ttl_s)
        try:
            others = self._active_rollouts(except_name=name)
            if others:
                raise FleetError(f"fleet {self.fleet!r} has an unfinished rollout {others[0]!r}; "
                                 "wait for it or abort it")
            rec = self.targets.prepare(name, model_uri, cfg)
            rec["history"], rec["generation"] = history, generation
            rec["rollout_uid"] = uuid.uuid4().hex  # this generation's id: its end is recorded under it
            self.records.save(rec)
            log.info("rollout %s: %s version %s to fleet %s", name, rec["model"]["name"],
                     rec["model"]["version"], self.fleet)
            if not wait:
                return rec
            return self.waves.run(rec, block=wait if block is None else block)
        finally:
            self.release_lock()

    def update(self, name: str, model_uri: str | None, cfg: WaveRolloutConfig | None, *,
               wait: bool = True, block: bool | None = None) -> dict[str, Any]:
        """Roll out another version under an existing rollout name (after the last one ended)."""
        self.fleet_trust.require_key()
        rec = self.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}; create it first")
        if rec["state"] not in TERMINAL:
            raise FleetError(f"rollout {name!r} is {rec['state']}; abort it before updating")
        cfg = cfg or WaveRolloutConfig.from_dict(rec["config"])
        uri = model_uri or rec["model"]["uri"]
        summary = {k: rec.get(k) for k in ("generation", "state", "model", "reason", "updated_at")}
        return self._start(name, uri, cfg, wait=wait, block=block, history=rec.get("history", []) + [summary],
                           generation=rec.get("generation", 1) + 1)

    def abort(self, name: str, reason: str = "aborted by request") -> dict[str, Any]:
        """Ask a running rollout to stop and roll back; roll back here if nobody runs it."""
        rec = self.records.get(name, stale_ok=True)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}")
        if rec["state"] in TERMINAL:
            return rec
        self.store.put_json(self.keys.abort_request(name),
                            {"reason": reason, "generation": rec.get("generation", 1), "at": self.clock()})
        try:
            self.acquire_lock(name, WaveRolloutConfig.from_dict(rec["config"]).lock_ttl_s)
        except FleetError:
            log.info("rollout %s: abort requested; its controller will roll back", name)
            rec["abort_requested"] = reason  # for the caller's display; the request object is the truth
            return rec  # the running controller sees the request at its next poll
        try:
            self.fleet_trust.require_key()
            rec = self.records.get(name, stale_ok=True) or rec
            if rec["state"] not in TERMINAL:
                self.waves.rollback(rec, reason)
                self.registry.tag(rec)
            return rec
        finally:
            self.release_lock()

    def withdraw(self, name: str) -> dict[str, Any]:
        """``delete``: every device this rollout touched goes back to what it ran before it."""
        self.fleet_trust.require_key()
        rec = self.records.get(name, stale_ok=True)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}")
        if rec["state"] not in TERMINAL:
            rec = self.abort(name, "withdrawn")
            if rec["state"] not in TERMINAL:
                raise FleetError(f"rollout {name!r} is still running elsewhere; it will roll back, "
                                 "delete it again once it has stopped")
        if rec["state"] in ("aborted", "withdrawn"):
            rec["state"] = "withdrawn"
            self.records.save(rec)
            return rec
        self.acquire_lock(name, WaveRolloutConfig.from_dict(rec["config"]).lock_ttl_s)
        try:
            rec = self.get(name) or rec
            self.waves.rollback(rec, "withdrawn", final_state="withdrawn")
            self.registry.tag(rec)
            return rec
        finally:
            self.release_lock()

    def reconcile(self) -> list[dict[str, Any]]:
        """Run every pending or orphaned rollout of the fleet (the Kubernetes Job/CronJob entry).

        Only records this fleet's key signed are resumed; a planted or replayed one is reported and
        left alone (``untrusted``), and so is one whose end MLflow could not be asked about
        (``unchecked``). A rollout that is ``soaking`` or ``awaiting-approval`` is checked once (canaries, abort,
        approval, the soak's end) and, still waiting, left for the next run.
        """
        self.fleet_trust.require_key()
        self.publish_timestamp()
        self.unchecked = []
        done = []
        for rec in self.list():
            if rec.get("state") in ACTIVE:
                got = self._resume(rec)
                if got is not None:
                    done.append(got)
        return done

    def resume(self, name: str, *, lock_wait_s: float = 0.0) -> dict[str, Any] | None:
        """Run one recorded rollout on from where it stands, here (``edgeslim fleet approve``: an approved
        rollout promotes and runs its remaining waves). Returns its record, or None when it did not act:
        another controller holds the fleet lock and goes on with the rollout, the rollout ended
        meanwhile, its record is a replay (then in ``untrusted``), or MLflow did not answer the check
        of its end (then in ``unchecked``).

        ``lock_wait_s``: while another controller holds the lock and the rollout stays as it is, try
        again every ``poll_interval_s`` for this long: a ``reconcile`` that has just left the rollout
        waiting lets go, and one that waits on the rollout moves it on.
        """
        self.fleet_trust.require_key()
        self.unchecked = []
        rec = self.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}")
        if rec["state"] not in ACTIVE:
            return rec
        self.publish_timestamp()
        deadline = self.clock() + lock_wait_s
        while True:
            got = self._resume(rec)
            now = self.get(name)
            if got is not None or now is None or now["state"] != rec["state"] or self.clock() >= deadline \
                    or self.keys.rollout(name) in self.untrusted or name in self.unchecked:
                return got
            self.sleep(WaveRolloutConfig.from_dict(now["config"]).poll_interval_s)
            rec = now

    def lock_holder(self) -> dict[str, Any] | None:
        """Who holds the fleet lock now (``rollout``, ``holder``, ``left_s``); None when nobody does."""
        return self.lock.held()

    def _resume(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """Under the fleet lock: roll back on an abort request, else run the waves on; a soak or an
        approval still outstanding is checked once. None when it did not act (see :meth:`resume`)."""
        cfg = WaveRolloutConfig.from_dict(rec["config"])
        try:
            self.acquire_lock(rec["name"], cfg.lock_ttl_s)
        except FleetError as exc:
            log.info("skipping %s: %s", rec["name"], exc)
            return None
        try:
            try:
                rec = self.get(rec["name"])
            except FleetError as exc:  # replayed, or the controller state cannot be trusted
                log.error("%s", exc)
                self.untrusted.append(self.keys.rollout(rec["name"]))
                return None
            if rec is None or rec["state"] not in ACTIVE:  # it ended (or went) meanwhile
                return None
            if not isinstance(rec.get("rollout_uid"), str):
                log.error("rollout %s: not resumed: its record carries no rollout id, so its end cannot be "
                          "checked; abort it, or roll it out again with `edgeslim fleet update`", rec["name"])
                self.untrusted.append(self.keys.rollout(rec["name"]))
                return None
            try:
                ended, floor = self.registry.ended(rec)
                if not ended:
                    self.state.require_floor(floor, f"MLflow's end tags of {rec['model']['name']} version "
                                                    f"{rec['model']['version']}")
            except RegistryUnavailable as exc:
                log.error("rollout %s: not resumed: %s; it is resumed once MLflow answers", rec["name"], exc)
                self.unchecked.append(rec["name"])
                return None
            except StaleState as exc:
                log.error("rollout %s: not resumed: %s", rec["name"], exc)
                self.untrusted.append(self.keys.rollout(rec["name"]))
                return None
            if ended:
                log.error("rollout %s: not resumed: its record says %s, but MLflow recorded this generation "
                          "(rollout id %s) as %s: an older version of the record was put back (a replay)",
                          rec["name"], rec["state"], rec["rollout_uid"], ended.get("state"))
                self.untrusted.append(self.keys.rollout(rec["name"]))
                return None
            requested = self.records.abort_requested(rec)
            if requested:
                self.waves.rollback(rec, requested)
                self.registry.tag(rec)
                return rec
            return self.waves.run(rec, block=False)
        finally:
            self.release_lock()


def fleet_summary(controller: Controller, rec: dict[str, Any]) -> dict[str, Any]:
    """A rollout as ``get`` shows it: the record plus each device's live state."""
    devs = controller.devices()
    live = {}
    for dev, d in rec.get("devices", {}).items():
        st = (devs.get(dev) or {}).get("status") or {}
        cur = st.get("current") if isinstance(st.get("current"), dict) else {}
        beat = st.get("heartbeat_at")
        live[dev] = {"outcome": d.get("outcome"), "reason": d.get("reason"),
                     "running": str(cur.get("sha256") or "")[:12] or None, "backend": cur.get("backend"),
                     "heartbeat_age_s": round(controller.clock() - beat, 1) if isinstance(beat, (int, float)) else None}
    reported, failed = tally(rec)
    out = {"name": rec["name"], "fleet": rec["fleet"], "state": rec["state"], "reason": rec.get("reason"),
           "model": rec["model"], "generation": rec.get("generation", 1),
           "waves": [{"index": w["index"], "devices": len(w["devices"]), "state": w["state"]} for w in rec["waves"]],
           "reported": reported, "failed": failed, "devices": live,
           "artifact_sha256": rec["artifact"]["sha256"],
           "promote": (rec.get("config") or {}).get("promote", "auto")}
    p = rec.get("promotion")
    if isinstance(p, dict):
        now = controller.clock()
        promo = {k: p.get(k) for k in ("policy", "since", "approval", "passed_at")}
        if rec["state"] == "soaking" and isinstance(p.get("until"), (int, float)):
            promo["soak_left_s"] = round(max(0.0, p["until"] - now), 1)
            promo["next"] = ("promoted once the soak ends; `edgeslim fleet reconcile` (the CronJob) continues it "
                             "if no controller is waiting on it")
        elif rec["state"] == "awaiting-approval":
            promo["waiting_s"] = round(max(0.0, now - float(p.get("since") or now)), 1)
            # The approval object is the truth: it shows before a controller has read it into the record.
            approved = promo.get("approval") or controller.promotion.approval(rec)
            if approved:
                promo["approval"] = approved
                promo["next"] = approved_next(controller, rec)
            else:
                promo["next"] = (f"edgeslim fleet approve {rec['fleet']} {rec['name']}  (or mlflow deployments "
                                 f"update -t edge:/{rec['fleet']} --name {rec['name']} -C action=approve)")
        out["promotion"] = promo
    if rec.get("aliases"):
        out["aliases"] = rec["aliases"]
    return out


def approved_next(controller: Controller, rec: dict[str, Any]) -> str:
    """What promotes an approved rollout that still stands ``awaiting-approval``: the controller
    holding the fleet lock, or, when none does, the next ``reconcile``."""
    held = controller.lock_holder()
    if held and held.get("rollout") == rec["name"]:
        return f"approved; the controller holding the fleet lock ({held.get('holder')}) promotes it at its next poll"
    return (f"approved; no controller is running it: `edgeslim fleet reconcile {rec['fleet']}` (the CronJob, or "
            f"run it with the fleet key) promotes it")


def follow_alias(controller: Controller, model: str, alias: str, rollout: str | None = None,
                 raw_config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Start a rollout of the version ``alias`` points at, unless this fleet already has one.

    The entry of the CronJob and of the registry webhook: idempotent, so a
    repeated trigger for the same version does nothing and returns ``None``.

    Promotion is not automatic here unless the fleet opted in: without ``promote`` in
    ``raw_config`` the rollout uses ``promote=auto`` only if the fleet's signed policy says
    ``auto_promote`` (``edgeslim fleet policy FLEET --auto-promote true``), else
    ``promote=approval``. The waves run here, but a soak or an approval is waited for only
    with an explicit ``wait=true``; otherwise the rollout is left for ``reconcile``.
    """
    raw = dict(raw_config or {})
    explicit_wait = "wait" in raw
    wait = raw.pop("wait", True)
    wait = wait if isinstance(wait, bool) else str(wait).lower() in ("true", "1", "yes")
    block = wait if explicit_wait else False
    ref = resolve_model(f"models:/{model}@{alias}")
    for rec in controller.list():
        m = rec.get("model") or {}
        if m.get("name") == ref.name and str(m.get("version")) == ref.version and rec.get("state") != "failed":
            return None
    name = rollout or f"{ref.name}-v{ref.version}"
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name)[:128]
    if "promote" not in raw:
        raw["promote"] = "auto" if controller.policy()["auto_promote"] else "approval"
    cfg = WaveRolloutConfig.from_strings(raw)
    log.info("rollout %s: promote=%s%s", name, cfg.promote, "" if "promote" in (raw_config or {}) else
             " (the fleet's policy; -C promote=... overrides it)")
    if controller.get(name):
        return controller.update(name, ref.uri, cfg, wait=wait, block=block)
    return controller.create(name, f"models:/{ref.name}/{ref.version}", cfg, wait=wait, block=block)
