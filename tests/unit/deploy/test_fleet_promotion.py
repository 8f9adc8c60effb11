"""Promotion as a policy: soak, approval, abort while waiting, the fleet's signed auto-promote policy.

In-process agents on a local store; the controller's clock is a fake one that its sleep
advances (so a one-hour soak or a silent canary takes no real time), and MLflow is a fake
registry holding aliases and tags, so the alias contract is checked exactly:
``edge-candidate`` -> canary wave -> ``edge-canary`` -> soak or approval -> ``edge-stable``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from fleet_unit_helpers import golden_for, make_onnx, upload
from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.components.common.hashing import file_sha256
from edgeslim.deploy import trust
from edgeslim.deploy.agent.device import Agent, AgentSettings
from edgeslim.deploy.controller import (
    Controller, ModelRef, WaveRolloutConfig, approval_key, fleet_summary, follow_alias, policy_key, wave_plan,
)
from edgeslim.deploy.store import FleetKeys


class FakeRegistry:
    """The slice of ``MlflowClient`` the controller uses: one registered model's aliases and tags."""

    def __init__(self, aliases=None):
        self.aliases = dict(aliases or {})
        self.tags: dict[tuple[str, str], str] = {}

    def get_registered_model(self, name):
        return SimpleNamespace(aliases=dict(self.aliases))

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = str(version)

    def delete_registered_model_alias(self, name, alias):
        del self.aliases[alias]

    def set_model_version_tag(self, name, version, key, value):
        self.tags[(str(version), key)] = value

    def get_model_version(self, name, version):
        return SimpleNamespace(tags={k: v for (ver, k), v in self.tags.items() if ver == str(version)})


class Clock:
    def __init__(self):
        self.t = time.time()

    def __call__(self):
        return self.t


class PromoFleet:
    """Agents that heartbeat on every controller sleep; a fake clock the sleep advances."""

    def __init__(self, store, kit, tmp_path, n):
        self.kit, self.store, self.tmp = kit, store, tmp_path
        self.agents = {f"d{i}": Agent(store=store, fleet="f", device_id=f"d{i}", device_class="cls-a",
                                      state_dir=tmp_path / f"d{i}", root=kit.root,
                                      settings=AgentSettings(poll_interval=0.01))
                       for i in range(n)}
        for a in self.agents.values():
            a.recover()
            a.register()
        kit.enrol(store, self.agents.values())
        self.models = [make_onnx(tmp_path / f"v{i}.onnx", seed=i) for i in range(3)]
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.offline: set[str] = set()
        self.hooks: list = []  # called after every sleep

    def sleep(self, dt):
        self.clock.t += dt
        for name, a in self.agents.items():
            if name not in self.offline:
                a.step()
                a.publish_status("idle")  # its heartbeat
        for hook in list(self.hooks):
            hook()

    def controller(self, **kw) -> Controller:
        c = self.kit.controller(self.store, clock=self.clock, sleep=self.sleep, **kw)
        c.registry.client = lambda: self.registry
        return c

    def keyless(self) -> Controller:
        """Someone with the root but without the fleet key (an approver, an operator's `get`)."""
        c = Controller(self.store, "f", root=self.kit.root, clock=self.clock)
        c.registry.client = lambda: self.registry
        return c

    def approve(self, c, name, by=None):
        """``c.approve`` as the approver: with the approver key."""
        return c.approve(name, by=by, approver_key=self.kit.approver_key)

    def record(self, name, model_path, version, **cfg):
        cfg = WaveRolloutConfig.from_dict({"poll_interval_s": 0.05, "wave_timeout_s": 5.0, **cfg})
        artifact = upload(self.store, model_path)
        target = {"artifact": artifact, "engines": {}, "health_check": golden_for(model_path),
                  "model": {"name": "m", "version": version, "alias": "edge-candidate", "run_id": None,
                            "uri": "models:/m@edge-candidate"},
                  "release": self.kit.release(artifact, name="m", version=version)}
        self.kit.controller(self.store).put_target(target)
        return {"name": name, "fleet": "f", "state": "pending", "generation": 1, "rollout_uid": f"uid-{name}", **target,
                "config": cfg.to_dict(), "waves": [], "devices": {}, "abort_requested": None, "reason": None,
                "history": []}

    def stored(self, name):
        got = self.store.get_json(FleetKeys("f").rollout(name))
        return got[0]["signed"] if got else None

    def manifest(self, dev):
        got = self.store.get_json(FleetKeys("f").manifest(dev))
        return got[0]["signed"] if got else None

    def running(self, dev):
        link = self.agents[dev].state_dir / "current"
        return file_sha256(link / "model.onnx") if link.exists() else None

    def baseline(self, c):
        """Version 1 on every device, edge-canary and edge-stable on it (promote=auto)."""
        rec = c.waves.run(self.record("r0", self.models[0], "1", waves=[100]))
        assert rec["state"] == "succeeded"
        assert self.registry.aliases == {"edge-canary": "1", "edge-stable": "1"}
        return rec["artifact"]["sha256"]


@pytest.fixture
def fleet(store, keys, tmp_path):
    return lambda n: PromoFleet(store, keys, tmp_path, n)


def _canary(name, f):
    return wave_plan(name, sorted(f.agents), [30, 100])[0][0]


def test_soak_waits_with_the_canary_only_then_promotes_and_moves_edge_stable(fleet):
    f = fleet(3)
    c = f.controller()
    v1 = f.baseline(c)
    canary = _canary("r1", f)
    seen = []

    def during():
        rec = f.stored("r1")
        if rec and rec["state"] == "soaking" and not seen:
            seen.append({"aliases": dict(f.registry.aliases),
                         "touched": sorted(d for d in f.agents if f.manifest(d)["rollout_id"] == "r1"),
                         "summary": fleet_summary(f.keyless(), f.keyless().get("r1"))})

    f.hooks.append(during)
    rec = c.waves.run(f.record("r1", f.models[1], "2", waves=[30, 100], promote="soak", soak_s=1.0))
    assert rec["state"] == "succeeded"
    # While soaking: the canary runs v2, edge-canary moved, edge-stable and the other devices not yet.
    assert seen and seen[0]["aliases"] == {"edge-canary": "2", "edge-stable": "1"}
    assert seen[0]["touched"] == [canary]
    summary = seen[0]["summary"]
    assert summary["state"] == "soaking" and summary["promote"] == "soak"
    assert 0 < summary["promotion"]["soak_left_s"] <= 1.0
    # Promoted only after soak_s (by the controller's clock), then the rest of the fleet and edge-stable.
    p = rec["promotion"]
    assert p["passed_at"] >= p["since"] + 1.0 and p["approval"] is None
    assert f.registry.aliases == {"edge-canary": "2", "edge-stable": "2"}
    assert rec["aliases"]["edge-canary"] == {"before": "1", "to": "2"}
    assert all(f.running(d) == rec["artifact"]["sha256"] != v1 for d in f.agents)
    assert {d["outcome"] for d in rec["devices"].values()} == {"committed"}


def test_a_canary_failing_during_the_soak_aborts_rolls_back_and_edge_canary_goes_back(fleet):
    f = fleet(3)
    c = f.controller()
    v1 = f.baseline(c)
    canary = _canary("r1", f)
    polls = []

    def fail_during_soak():
        rec = f.stored("r1")
        if rec and rec["state"] == "soaking":
            polls.append(1)
            if len(polls) == 3:  # a few healthy polls into the soak, the canary's model breaks
                a = f.agents[canary]
                f.offline.add(canary)
                a.publish_status("idle", last={**a.state["last"], "result": "rolled_back",
                                               "reason": "watchdog: inference crashed"})

    f.hooks.append(fail_during_soak)
    rec = c.waves.run(f.record("r1", f.models[1], "2", waves=[30, 100], promote="soak", soak_s=3600))
    assert rec["state"] == "aborted" and "1 of 1 reported devices failed" in rec["reason"]
    d = rec["devices"][canary]
    assert d["outcome"] == "failed" and "during the soak" in d["reason"] and "watchdog" in d["reason"]
    assert list(rec["devices"]) == [canary]  # the later wave was never touched
    assert rec["promotion"]["passed_at"] is None
    assert f.registry.aliases == {"edge-canary": "1", "edge-stable": "1"}  # edge-canary is back
    assert rec["aliases"]["edge-canary"]["restored"] == "back to version 1"
    assert f.manifest(canary)["action"] == "rollback"
    f.offline.clear()
    f.sleep(0)
    assert all(f.running(dev) == v1 for dev in f.agents)
    assert json.loads(f.registry.tags[("2", "edgeslim.fleet.f")])["state"] == "aborted"


def test_a_canary_going_silent_during_the_soak_aborts_when_resumed(fleet):
    f = fleet(2)
    c = f.controller()
    f.baseline(c)
    canary = wave_plan("r1", sorted(f.agents), [50, 100])[0][0]
    rec = c.waves.run(f.record("r1", f.models[1], "2", waves=[50, 100], promote="soak", soak_s=3600,
                                 wave_timeout_s=0.5), block=False)
    assert rec["state"] == "soaking"  # checked once, left for the next run
    f.offline.add(canary)  # no more statuses from it
    rec = c.waves.run(c.get("r1"))  # resumed (as after a controller restart), waiting here
    assert rec["state"] == "aborted"
    assert rec["devices"][canary]["outcome"] == "silent"
    assert "during the soak" in rec["devices"][canary]["reason"]
    assert f.registry.aliases["edge-canary"] == "1"


def test_approval_gate_reconcile_checks_once_ignores_forged_approvals_and_promotes_on_approve(fleet):
    f = fleet(3)
    c = f.controller()
    f.baseline(c)
    canary = _canary("r1", f)
    rec = f.record("r1", f.models[1], "2", waves=[30, 100], promote="approval")
    c.records.save(rec)
    done = c.reconcile()  # the CronJob: runs the canary wave, checks the gate once, returns
    assert [(r["name"], r["state"]) for r in done] == [("r1", "awaiting-approval")]
    assert f.registry.aliases == {"edge-canary": "2", "edge-stable": "1"}
    assert sorted(d for d in f.agents if f.manifest(d)["rollout_id"] == "r1") == [canary]
    assert f.store.get_json(FleetKeys("f").lock) is None  # nobody sits on the lock while waiting
    summary = fleet_summary(f.keyless(), f.keyless().get("r1"))
    assert summary["state"] == "awaiting-approval" and "edgeslim fleet approve f r1" in summary["promotion"]["next"]
    assert summary["promotion"]["waiting_s"] >= 0

    # Planted approvals: unsigned, signed by the fleet key (not an approver's), or signed by the approver
    # key for another generation, rollout id, rollout, model or fleet, or before the canary wave ended
    # (a pre-approval), or junk. None promotes.
    good = {"type": "edgeslim.fleet.approval", "fleet": "f", "rollout": "r1", "generation": 1,
            "rollout_uid": "uid-r1", "artifact_sha256": rec["artifact"]["sha256"],
            "canary_done_at": c.get("r1")["promotion"]["since"], "by": "mallory", "at": f.clock()}
    key = approval_key(FleetKeys("f"), "r1")

    def signed(body):
        return trust.sign_with(body, [f.kit.approver_key])

    for forged in (good, {"signed": good, "signatures": []}, trust.sign_with(good, [f.kit.fleet_key]),
                   signed({**good, "generation": 2}), signed({**good, "rollout_uid": "uid-r0"}),
                   signed({**good, "canary_done_at": None}), signed({**good, "canary_done_at": good["at"] - 60}),
                   signed({**good, "rollout": "r0"}), signed({**good, "artifact_sha256": "0" * 64}),
                   signed({**good, "fleet": "g"}), signed({**good, "type": "edgeslim.fleet.request"}), [good],
                   "approved"):
        f.store.put_json(key, forged)
        assert [r["state"] for r in c.reconcile()] == ["awaiting-approval"], forged
    f.store.put(key, b"[" * 100_000)
    assert [r["state"] for r in c.reconcile()] == ["awaiting-approval"]
    assert f.registry.aliases["edge-stable"] == "1"
    assert sorted(d for d in f.agents if f.manifest(d)["rollout_id"] == "r1") == [canary]

    approver = f.keyless()  # no fleet key needed to approve, but the approver key
    with pytest.raises(ConfigError, match="approver key"):
        approver.approve("r1", by="mallory")
    with pytest.raises(ConfigError, match="not an approver key of root version 1"):
        approver.approve("r1", by="mallory", approver_key=f.kit.fleet_key)
    f.approve(approver, "r1", by="alice")
    done = c.reconcile()
    assert [(r["name"], r["state"]) for r in done] == [("r1", "succeeded")]
    assert done[0]["promotion"]["approval"]["by"] == "alice"
    assert f.registry.aliases == {"edge-canary": "2", "edge-stable": "2"}
    assert all(f.running(d) == done[0]["artifact"]["sha256"] for d in f.agents)
    with pytest.raises(FleetError, match="nothing to approve"):
        f.approve(approver, "r1")


def test_get_shows_an_approval_at_once_and_approve_with_the_fleet_key_promotes_with_no_further_command(
        fleet, capsys):
    from edgeslim.deploy import fleet_cli

    f = fleet(3)
    c = f.controller()
    f.baseline(c)
    c.records.save(f.record("r1", f.models[1], "2", waves=[30, 100], promote="approval"))
    assert [r["state"] for r in c.reconcile()] == ["awaiting-approval"]

    # An approval no controller has read yet: `get` shows it, and what promotes it.
    approver = f.keyless()
    f.approve(approver, "r1", by="alice")
    promo = fleet_summary(approver, approver.get("r1"))["promotion"]
    assert promo["approval"]["by"] == "alice"
    assert "no controller is running it: `edgeslim fleet reconcile f`" in promo["next"]
    f.store.put_json(FleetKeys("f").lock, {"rollout": "r1", "holder": "ctl-7", "ttl_s": 900.0})
    promo = fleet_summary(approver, approver.get("r1"))["promotion"]
    assert promo["next"] == "approved; the controller holding the fleet lock (ctl-7) promotes it at its next poll"
    # Without the fleet key, `approve` records and says what runs next; it promotes nothing itself.
    assert fleet_cli.approve(approver, "r1", by="alice", approver_key=f.kit.approver_key) == 0
    assert "(ctl-7) promotes it at its next poll (no fleet key here" in capsys.readouterr().err
    assert f.stored("r1")["state"] == "awaiting-approval"
    # With it, the same command promotes and runs the remaining waves, once the lock is free: a lock
    # held throughout is another controller's to act on, and the command says so...
    assert fleet_cli.approve(c, "r1", by="alice", approver_key=f.kit.approver_key) == 0
    assert "(ctl-7) promotes it at its next poll" in capsys.readouterr().err
    assert f.stored("r1")["state"] == "awaiting-approval"
    # ... and one let go of meanwhile (a `reconcile` ending its check) is taken, and the rollout run here.
    f.hooks.append(lambda: f.store.delete(FleetKeys("f").lock) if f.store.get_json(FleetKeys("f").lock) and
                   f.store.get_json(FleetKeys("f").lock)[0].get("holder") == "ctl-7" else None)
    assert fleet_cli.approve(c, "r1", by="alice", approver_key=f.kit.approver_key) == 0
    out = capsys.readouterr()
    assert "approved; promoting it here and running its remaining waves" in out.err
    got = json.loads(out.out)
    assert got["state"] == "succeeded" and got["promotion"]["approval"]["by"] == "alice"
    assert f.registry.aliases == {"edge-canary": "2", "edge-stable": "2"}
    assert all(f.running(d) == got["artifact_sha256"] for d in f.agents)


def test_approve_is_refused_before_the_canary_wave_and_for_other_policies(fleet):
    f = fleet(1)
    c = f.controller()
    c.records.save(f.record("r1", f.models[0], "1", promote="approval"))
    with pytest.raises(FleetError, match="canary wave has not finished"):
        f.approve(f.keyless(), "r1")
    c.records.save(f.record("r2", f.models[0], "1", promote="soak"))
    with pytest.raises(FleetError, match="promote=soak, not approval"):
        f.approve(f.keyless(), "r2")
    with pytest.raises(FleetError, match="no rollout 'r3'"):
        f.approve(f.keyless(), "r3")


def test_abort_while_awaiting_approval_rolls_back_and_puts_edge_canary_back(fleet):
    f = fleet(3)
    c = f.controller()
    v1 = f.baseline(c)
    canary = _canary("r1", f)

    def abort_when_waiting():
        rec = f.stored("r1")
        if rec and rec["state"] == "awaiting-approval" and not rec.get("abort_requested"):
            assert f.registry.aliases["edge-canary"] == "2"
            f.keyless().abort("r1", "operator said no")  # the lock is held: it asks, the waiting controller acts

    f.hooks.append(abort_when_waiting)
    c.acquire_lock("r1", 60)  # as create() does
    rec = c.waves.run(f.record("r1", f.models[1], "2", waves=[30, 100], promote="approval"))
    assert rec["state"] == "aborted" and rec["reason"] == "operator said no"
    assert f.registry.aliases == {"edge-canary": "1", "edge-stable": "1"}
    assert list(rec["devices"]) == [canary] and f.manifest(canary)["action"] == "rollback"
    f.sleep(0)
    assert all(f.running(d) == v1 for d in f.agents)


def test_abort_of_a_rollout_left_awaiting_approval_deletes_an_edge_canary_it_created(fleet):
    f = fleet(2)
    c = f.controller()
    c.records.save(f.record("r1", f.models[0], "1", waves=[50, 100], promote="approval"))
    assert [r["state"] for r in c.reconcile()] == ["awaiting-approval"]
    assert f.registry.aliases == {"edge-canary": "1"}
    rec = f.controller().abort("r1")  # nobody holds the lock: this controller rolls back itself
    assert rec["state"] == "aborted"
    assert f.registry.aliases == {}  # there was no edge-canary before this rollout
    assert rec["aliases"]["edge-canary"]["restored"].startswith("deleted")


def test_an_edge_canary_moved_by_someone_else_since_is_left_alone_on_abort(fleet):
    f = fleet(2)
    c = f.controller()
    c.records.save(f.record("r1", f.models[0], "1", waves=[50, 100], promote="approval"))
    c.reconcile()
    f.registry.aliases["edge-canary"] = "7"  # a person moved it meanwhile
    rec = f.controller().abort("r1")
    assert f.registry.aliases == {"edge-canary": "7"}
    assert "left alone" in rec["aliases"]["edge-canary"]["restored"]


# ---------------------------------------------------------------------- the fleet's policy
def test_policy_defaults_off_is_signed_and_a_planted_or_replayed_one_is_ignored(store, keys, tmp_path):
    from tests.fleet_trust import TrustKit

    c = keys.controller(store)
    assert c.policy()["auto_promote"] is False
    c.set_policy(auto_promote=True)
    assert c.policy()["auto_promote"] is True
    c.set_policy(auto_promote=False)
    # A bucket writer plants auto_promote: true, unsigned, or signed by a key that is not this fleet's.
    store.put_json(policy_key(FleetKeys("f")), {"signed": {"type": "edgeslim.fleet.policy", "fleet": "f",
                                                           "auto_promote": True, "updated_at": time.time()},
                                                "signatures": []})
    assert c.policy()["auto_promote"] is False and "ignored" in c.policy()
    other = TrustKit(tmp_path / "other", fleet="f")
    store.put_json(policy_key(FleetKeys("f")), trust.sign_with(
        {"type": "edgeslim.fleet.policy", "fleet": "f", "auto_promote": True, "updated_at": time.time()},
        [other.fleet_key]))
    assert c.policy()["auto_promote"] is False
    # ... or puts back the fleet's own, older "true" after it was turned off (whatever its time stamps say).
    c.set_policy(auto_promote=True)
    older = store.get(policy_key(FleetKeys("f"))).data
    assert c.set_policy(auto_promote=False)["version"] == c.policy()["version"] == 4
    store.put(policy_key(FleetKeys("f")), older)
    pol = keys.controller(store).policy()  # a fresh controller: the version seen is in the signed state
    assert pol["auto_promote"] is False and "version 3" in pol["ignored"] and "put back" in pol["ignored"]


def test_follow_alias_asks_for_approval_unless_the_fleet_or_the_command_line_says_auto(store, keys, monkeypatch):
    monkeypatch.setattr("edgeslim.deploy.controller.resolve_model",
                        lambda uri: ModelRef(name="m", version="3", alias="edge-candidate", run_id=None, uri=uri))
    c = keys.controller(store)
    started = []
    c.create = lambda name, uri, cfg, wait, block: started.append((cfg.promote, wait, block)) or None
    follow_alias(c, "m", "edge-candidate")
    assert started[-1] == ("approval", True, False)  # the waves run, the gate is not waited on
    follow_alias(c, "m", "edge-candidate", raw_config={"promote": "auto"})
    assert started[-1][0] == "auto"
    follow_alias(c, "m", "edge-candidate", raw_config={"wait": "true"})
    assert started[-1] == ("approval", True, True)  # an explicit wait=true waits for the approval too
    c.set_policy(auto_promote=True)
    follow_alias(c, "m", "edge-candidate")
    assert started[-1][0] == "auto"
    follow_alias(c, "m", "edge-candidate", raw_config={"promote": "soak", "soak_s": "60"})
    assert started[-1][0] == "soak"


def test_cli_policy_and_approve(store, keys, tmp_path):
    base = ["--store", str(tmp_path / "store"), "--root", str(keys.root_path)]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgeslim", "fleet", *args], capture_output=True, text=True,
                              timeout=600)

    out = cli("policy", "f", *base, "--signing-key", str(keys.paths["fleet"][0]), "--auto-promote", "true")
    assert out.returncode == 0, out.stderr
    assert json.loads(cli("policy", "f", *base, "--json").stdout)["auto_promote"] is True
    assert store.get_json(policy_key(FleetKeys("f")))[0]["signatures"]  # signed
    nokey = cli("policy", "f", *base, "--auto-promote", "false")
    assert nokey.returncode == 2 and "signing key" in nokey.stderr
    got = cli("approve", "f", "nope", *base)  # no approver key: refused before anything is read
    assert got.returncode == 2 and "an approval is signed by an approver key" in got.stderr
    got = cli("approve", "f", "nope", *base, "--approver-key", str(keys.paths["approver"][0]))
    assert got.returncode == 2 and "no rollout 'nope'" in got.stderr and "Traceback" not in got.stderr


def test_mlflow_deployments_update_action_approve_needs_no_key(fleet, keys, tmp_path, monkeypatch):
    from edgeslim.plugins.mlflow_deploy import EdgeDeploymentClient

    f = fleet(2)
    c = f.controller()
    c.records.save(f.record("r1", f.models[0], "1", waves=[50, 100], promote="approval"))
    assert [r["state"] for r in c.reconcile()] == ["awaiting-approval"]
    monkeypatch.delenv("EDGESLIM_FLEET_SIGNING_KEY", raising=False)
    monkeypatch.setenv("EDGESLIM_APPROVER_KEY", str(keys.paths["approver"][0]))
    out = EdgeDeploymentClient("edge:/f").update_deployment(
        "r1", config={"action": "approve", "store": str(tmp_path / "store"), "root": str(keys.root_path)})
    assert out["state"] == "awaiting-approval" and "approved" in out["approved"]
    assert "controller_log" not in out  # no fleet key here: the CronJob (or a waiting controller) goes on
    assert [r["state"] for r in c.reconcile()] == ["succeeded"]
    assert f.registry.aliases == {"edge-canary": "1", "edge-stable": "1"}
