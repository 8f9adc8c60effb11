"""The waves of a rollout: signed manifests out, signed statuses back, roll back on failure.

Devices are split into waves (canary first) by :func:`wave_plan`. Each device gets a manifest
one sequence above anything it has seen; a wave waits for every device's answer, naming that
manifest by sequence and digest, up to ``wave_timeout_s`` (a silent device counts as failed),
and the rollout aborts once ``min_reported`` devices have reported and the failure share is
above ``max_failure_pct``: every device it touched then gets a new, higher-sequence manifest
back to what it ran before. After the canary wave, the promotion gate decides whether and when
the other waves follow.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

from edgeslim.components.common import progress
from edgeslim.components.common.errors import FleetError
from edgeslim.deploy import bounded
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_devices import FleetDevices, reported_sha, sequence_number
from edgeslim.deploy.fleet_lock import FleetLock
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.manifest import Artifact, Manifest, manifest_digest
from edgeslim.deploy.promotion import Promotion
from edgeslim.deploy.records import RolloutRecords, over_threshold
from edgeslim.deploy.registry_sync import RegistrySync
from edgeslim.deploy.rollout_config import WAITING, WaveRolloutConfig
from edgeslim.deploy.store import PreconditionFailed
from edgeslim.deploy.targets import ReleaseTargets

log = logging.getLogger("edgeslim.controller")


def wave_plan(rollout: str, devices: list[str], waves: list[float]) -> list[list[str]]:
    """Split devices into waves: a stable pseudo-random order, cumulative percentages.

    The order depends on the rollout name, so the canary differs between rollouts
    but the same rollout always plans the same waves (a resumed controller agrees).
    """
    order = sorted(devices, key=lambda d: hashlib.sha256(f"{rollout}/{d}".encode()).hexdigest())
    n, plan, done = len(order), [], 0
    pcts = list(waves) + ([100.0] if waves[-1] < 100 else [])
    for pct in pcts:
        upto = min(n, max(done + 1, math.ceil(pct * n / 100.0)))
        if upto > done:
            plan.append(order[done:upto])
            done = upto
    return plan


def manifest_artifact(d: dict[str, Any]) -> Artifact:
    """A manifest's :class:`~edgeslim.deploy.manifest.Artifact` from an artifact entry of a target or record."""
    return Artifact(key=d["key"], sha256=d["sha256"], size=int(d["size"]), format=d.get("format", "onnx"),
                    metadata=d.get("metadata") or {})


class WaveRunner(FleetPart):
    """Runs (or resumes) a rollout, wave by wave, under the lock its controller holds."""

    def __init__(self, ctx: FleetContext, *, fleet_trust: FleetTrust, records: RolloutRecords,
                 fleet_devices: FleetDevices, lock: FleetLock, targets: ReleaseTargets, promotion: Promotion,
                 registry: RegistrySync) -> None:
        super().__init__(ctx)
        self.fleet_trust, self.records, self.fleet_devices, self.lock = fleet_trust, records, fleet_devices, lock
        self.targets, self.promotion, self.registry = targets, promotion, registry

    def _current_manifest(self, device: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the device's manifest as this fleet signed it or ``None``, the stored object's ETag)."""
        try:
            blob = self.store.get(self.keys.manifest(device), max_bytes=bounded.MAX_MANIFEST_BYTES)
        except bounded.BoundedInputError as exc:
            log.warning("device %s: stored manifest refused (%s)", device, exc)
            return None, (self.store.head(self.keys.manifest(device)) or (0, None))[1]
        if blob is None:
            return None, None
        try:
            env = bounded.loads(blob.data, what=f"manifest of {device}", max_bytes=bounded.MAX_MANIFEST_BYTES)
            return self.fleet_trust.root.verify(env, "fleet", what=f"manifest of {device}"), blob.etag
        except FleetError as exc:
            log.warning("device %s: stored manifest is not this fleet's (%s); treating it as absent", device, exc)
            return None, blob.etag

    def _directed_sha(self, device: str) -> str | None:
        """The artifact of the device's current manifest, as this fleet signed it (None: withdraw/none)."""
        cur, _ = self._current_manifest(device)
        art = (cur or {}).get("artifact") if (cur or {}).get("action") in ("install", "rollback") else None
        return reported_sha({"current": art}) if isinstance(art, dict) else None

    def _write_manifest(self, rec: dict, device: str, device_class: str, *, action: str,
                        target: dict[str, Any] | None, status: dict[str, Any] | None) -> dict[str, Any]:
        """Sign and write one manifest, fenced on the manifest object this controller read."""
        cur, etag = self._current_manifest(device)
        seqs = [0, sequence_number((cur or {}).get("sequence")),
                sequence_number((status or {}).get("applied_sequence"))]
        seq = max(seqs) + 1
        now = self.clock()
        cfg = rec["config"]
        target = target or {}
        art = target.get("artifact")
        release = target.get("release")
        expires = now + float(cfg["expiry_s"])
        if release:
            expires = min(expires, float(release["signed"]["expires_at"]))
        before = reported_sha(status)
        m = Manifest(
            fleet=self.fleet, device_id=device, device_class=device_class, rollout_id=rec["name"],
            sequence=seq, issued_at=now, expires_at=expires, action=action,
            artifact=None if art is None else manifest_artifact(art),
            engine=None if not target.get("engine") else manifest_artifact(target["engine"]),
            model=target.get("model"), health_check=target.get("health_check"),
            previous={"sha256": before} if before else None, release=release,
        )
        env = m.sign(self.fleet_trust.signing_key)
        try:
            if etag is None:
                new = self.store.put_json(self.keys.manifest(device), env, if_none_match_any=True)
            else:
                new = self.store.put_json(self.keys.manifest(device), env, if_match=etag)
        except PreconditionFailed:
            raise FleetError(f"device {device}: its manifest changed while this controller wrote it "
                             "(another controller?); stopping") from None
        self.fleet_trust.note_sequence(device, seq)
        return {"sequence": seq, "etag": new, "sent_at": now, "action": action,
                "digest": manifest_digest(m.to_dict())}

    def _outcome(self, device: str, sent: dict[str, Any], public_key: str) -> tuple[str, str | None] | None:
        """``(outcome, reason)`` once the device has answered this manifest, else ``None``.

        The answer must come from the device's own key and name this manifest by sequence *and*
        digest. A device that signs junk about itself has failed.
        """
        st = self.fleet_devices.device_status(device, public_key)
        if not st:
            return None
        try:
            rej = st.get("rejected") or {}
            if rej.get("etag") == sent["etag"]:
                return "rejected", f"{rej.get('reason')}: {str(rej.get('message'))[:300]}"
            last = st.get("last") or {}
            if last.get("sequence") == sent["sequence"]:
                if sent.get("digest") and last.get("manifest_sha256") != sent["digest"]:
                    return "failed", "the device applied another manifest under this sequence"
                if last.get("result") == "committed":
                    return "committed", None
                return "failed", str(last.get("reason") or last.get("result"))[:500]
            if sequence_number(st.get("applied_sequence")) > sent["sequence"]:
                return "superseded", None
            return None
        except (AttributeError, TypeError) as exc:
            return "failed", f"unreadable status ({type(exc).__name__})"

    def run(self, rec: dict[str, Any], *, block: bool = True) -> dict[str, Any]:
        """Run (or resume) the rollout under the lock this controller holds.

        ``block``: wait through a soak or for an approval here; else check the promotion once and
        return the record ``soaking`` or ``awaiting-approval`` (``reconcile``, a CronJob, must not
        sit for hours on a gate: its next run checks again).
        """
        cfg = WaveRolloutConfig.from_dict(rec["config"])
        self.fleet_trust.publish_timestamp()
        devs = self.fleet_devices.devices()
        if cfg.device_class:
            devs = {d: v for d, v in devs.items() if v["device_class"] == cfg.device_class}
        if not devs and not rec["devices"]:
            rec["state"], rec["reason"] = "failed", "no enrolled, registered devices in the fleet"
            self.records.save(rec)
            raise FleetError(f"fleet {self.fleet!r} has no enrolled, registered devices"
                             + (f" of class {cfg.device_class!r}" if cfg.device_class else "")
                             + "; start edgeslim-agent on the devices and enrol them (`edgeslim fleet enrol`)")
        if not rec["waves"]:
            rec["waves"] = [{"index": i, "devices": w, "state": "planned"}
                            for i, w in enumerate(wave_plan(rec["name"], sorted(devs), cfg.waves))]
        if rec["state"] not in WAITING:
            rec["state"] = "running"
            self.records.save(rec)
        target_base = {"artifact": rec["artifact"], "model": rec["model"], "health_check": rec["health_check"],
                       "release": rec["release"]}
        for wave in rec["waves"]:
            if wave["state"] == "done":
                if wave["index"] == 0:  # resumed after the canary wave: the promotion decides (again)
                    if cfg.canary_alias and cfg.canary_alias not in (rec.get("aliases") or {}):
                        self.registry.set_alias(rec, cfg.canary_alias)  # stopped before it was moved (or it failed)
                    verdict, passed = self.promotion.gate(rec, cfg, block=block)
                    if verdict is not None:
                        return self._end_aborted(rec, verdict)
                    if not passed:
                        return rec
                continue
            requested = self.records.abort_requested(rec)
            if requested:
                return self._end_aborted(rec, requested)
            wave["state"], wave["started_at"] = "running", self.clock()
            for dev in wave["devices"]:
                if dev in rec["devices"] or dev not in devs:
                    continue  # resumed: this device already got its manifest (or left the inventory)
                dclass, st = devs[dev]["device_class"], devs[dev]["status"]
                # What it runs: its own signed word, else what this fleet last directed it to run (a
                # status made unreadable must not turn a later rollback into a withdraw).
                before = reported_sha(st) or self._directed_sha(dev)
                target = dict(target_base, engine=rec["engines"].get(dclass))
                sent = self._write_manifest(rec, dev, dclass, action="install", target=target, status=st)
                rec["devices"][dev] = {"wave": wave["index"], "device_class": dclass, "sent": sent,
                                       "before": before if isinstance(before, str) else None,
                                       "public_key": devs[dev]["public_key"], "outcome": None, "reason": None}
            self.records.save(rec)
            self.fleet_trust.publish_sequences()  # the floor a device that loses its state is held to
            log.info("rollout %s: wave %d (%d devices) sent", rec["name"], wave["index"], len(wave["devices"]))
            progress.emit("wave", f"rollout {rec['name']}: wave {wave['index'] + 1}/{len(rec['waves'])} sent to "
                                  f"{len(wave['devices'])} device(s)")
            verdict = self._wait_wave(rec, wave, cfg)
            wave["state"], wave["finished_at"] = "done", self.clock()
            self.records.save(rec)
            verdict = verdict or self.records.abort_requested(rec)  # an abort after the last report still counts
            if verdict is not None:
                return self._end_aborted(rec, verdict)
            if wave["index"] == 0:
                if cfg.canary_alias:
                    self.registry.set_alias(rec, cfg.canary_alias)
                verdict, passed = self.promotion.gate(rec, cfg, block=block)
                if verdict is not None:
                    return self._end_aborted(rec, verdict)
                if not passed:
                    return rec  # soaking or awaiting-approval; the next reconcile checks again
        requested = self.records.abort_requested(rec)
        if requested:
            return self._end_aborted(rec, requested)
        rec["state"] = "succeeded"
        self.records.save(rec)
        if cfg.stable_alias:
            self.registry.set_alias(rec, cfg.stable_alias)
        self.registry.tag(rec)
        log.info("rollout %s succeeded", rec["name"])
        return rec

    def _end_aborted(self, rec: dict[str, Any], reason: str) -> dict[str, Any]:
        rec["abort_requested"] = rec.get("abort_requested") or None
        self.rollback(rec, reason)
        self.registry.tag(rec)
        return rec

    def _wait_wave(self, rec: dict[str, Any], wave: dict[str, Any], cfg: WaveRolloutConfig) -> str | None:
        deadline = self.clock() + cfg.wave_timeout_s
        waiting = [d for d in wave["devices"] if d in rec["devices"] and not rec["devices"][d]["outcome"]]
        last_renew = self.clock()
        while True:
            before = len(waiting)
            for dev in list(waiting):
                d = rec["devices"][dev]
                got = self._outcome(dev, d["sent"], d["public_key"])
                if got:
                    d["outcome"], d["reason"] = got
                    waiting.remove(dev)
                    log.info("rollout %s: %s %s%s", rec["name"], dev, got[0], f" ({got[1]})" if got[1] else "")
            if len(waiting) != before:
                n = len(wave["devices"])
                failed = sum(rec["devices"][d]["outcome"] in ("failed", "rejected", "silent")
                             for d in wave["devices"] if d in rec["devices"])
                progress.emit("wave", f"rollout {rec['name']}: wave {wave['index'] + 1}/{len(rec['waves'])}: "
                                      f"{n - len(waiting)} of {n} reported, {failed} failed, {len(waiting)} remaining")
            requested = self.records.abort_requested(rec)
            if requested:  # before anything else: an abort is never lost to a finished wave
                rec["abort_requested"] = requested
                return requested
            verdict = over_threshold(rec, cfg)
            if verdict:
                return verdict
            if not waiting:
                return None
            if self.clock() >= deadline:
                for dev in waiting:
                    rec["devices"][dev]["outcome"] = "silent"
                    rec["devices"][dev]["reason"] = f"no status within wave_timeout_s={cfg.wave_timeout_s:g}"
                self.records.save(rec)
                return over_threshold(rec, cfg)
            if self.clock() - last_renew > cfg.lock_ttl_s / 3:
                self.lock.renew(rec["name"], cfg.lock_ttl_s)
                self.fleet_trust.publish_timestamp()
                last_renew = self.clock()
            self.records.save(rec)
            self.sleep(cfg.poll_interval_s)

    def rollback(self, rec: dict[str, Any], reason: str, final_state: str = "aborted") -> None:
        """Every touched device gets a new, higher-sequence manifest back to what it ran before.

        "Before" is what the device itself (signed) said it ran when this rollout reached it, not
        any manifest's claim. One device that fails here does not stop the others; the record is
        saved after each device.
        """
        log.warning("rollout %s: %s; rolling back %d device(s)", rec["name"], reason, len(rec["devices"]))
        in_flight = rec["state"] != "succeeded"  # a withdrawn, finished rollout leaves the aliases alone
        rec["state"], rec["reason"] = "aborting", reason
        self.records.save(rec)
        devs = None
        for dev, d in rec["devices"].items():
            if d.get("rolled_back"):
                continue
            try:
                cur, _ = self._current_manifest(dev)
                # A later rollout that only rolled the device back to this rollout's model (it failed or was
                # aborted) does not supersede this one: the device still runs what this rollout installed.
                back_to_ours = bool(cur) and cur.get("action") == "rollback" and \
                    (cur.get("artifact") or {}).get("sha256") == rec["artifact"]["sha256"]
                if cur and cur.get("rollout_id") != rec["name"] and not back_to_ours:
                    d["rolled_back"] = {"skipped": f"superseded by rollout {cur.get('rollout_id')}"}
                    continue
                if devs is None:
                    devs = self.fleet_devices.devices()
                st = (devs.get(dev) or {}).get("status")
                before = d.get("before")
                target = self.targets.target(before) if before else None
                if before and target is None:
                    raise FleetError(f"no signed target for what it ran before ({before[:12]}); it keeps its model")
                if target is not None:
                    target = dict(target, engine=(target.get("engines") or {}).get(d["device_class"]))
                d["rolled_back"] = self._write_manifest(rec, dev, d["device_class"],
                                                        action="rollback" if target else "withdraw",
                                                        target=target, status=st)
            except Exception as exc:  # noqa: BLE001 - one device must not strand the others
                log.error("rollout %s: device %s not rolled back: %s", rec["name"], dev, exc)
                d["rolled_back"] = {"error": str(exc)[:500]}
            self.records.save(rec)
        try:
            self.fleet_trust.publish_sequences()
        except FleetError as exc:  # the rollbacks are written; the next publish names them
            log.error("rollout %s: sequence statement not re-signed: %s", rec["name"], exc)
        if in_flight:
            self.registry.restore_aliases(rec)
        rec["state"] = final_state
        self.records.save(rec)
