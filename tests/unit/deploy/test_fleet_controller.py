"""Rollout logic: waves, thresholds, silent devices, rollback, the lock.

Devices are in-process agents on a local store, stepped by the controller's
sleep; the MLflow side (alias resolution, aliases, tags) is exercised against
a real server in tests/integration/fleet.
"""

from __future__ import annotations

import time

import pytest

from fleet_unit_helpers import golden_for, make_onnx, upload
from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.components.common.hashing import file_sha256 as sha256_file
from edgeslim.deploy.agent.device import Agent, AgentSettings
from edgeslim.deploy.controller import Controller, WaveRolloutConfig, wave_plan
from edgeslim.deploy.store import FleetKeys


def test_wave_plan_is_canary_first_cumulative_and_stable():
    devs = [f"d{i:03d}" for i in range(100)]
    plan = wave_plan("r1", devs, [1, 10, 50, 100])
    assert [len(w) for w in plan] == [1, 9, 40, 50]
    assert sorted(sum(plan, [])) == devs
    assert wave_plan("r1", list(reversed(devs)), [1, 10, 50, 100]) == plan
    assert wave_plan("r2", devs, [1, 10, 50, 100])[0] != plan[0]  # canary differs per rollout
    assert [len(w) for w in wave_plan("r", devs[:3], [1, 10, 50])] == [1, 1, 1]  # 100 implied


def test_config_parses_cli_strings_and_refuses_secrets():
    cfg = WaveRolloutConfig.from_strings({"waves": "1,10,50,100", "max_failure_pct": "10",
                                          "wave_timeout_s": "600", "latency_budget_ms": "none"})
    assert cfg.waves == [1.0, 10.0, 50.0, 100.0] and cfg.latency_budget_ms is None
    with pytest.raises(ConfigError, match="never passed as config"):
        WaveRolloutConfig.from_strings({"aws_secret_access_key": "x"})
    with pytest.raises(ConfigError, match="must rise"):
        WaveRolloutConfig.from_strings({"waves": "50,10"})
    with pytest.raises(ConfigError, match="unknown key"):
        WaveRolloutConfig.from_strings({"wavez": "1"})


class Fleet:
    def __init__(self, store, keys, tmp_path, n, models):
        self.kit = keys
        self.store = store
        self.agents = {f"d{i}": Agent(store=store, fleet="f", device_id=f"d{i}", device_class="cls-a",
                                      state_dir=tmp_path / f"d{i}", root=keys.root,
                                      settings=AgentSettings(poll_interval=0.01))
                       for i in range(n)}
        self.offline: set[str] = set()
        for a in self.agents.values():
            a.recover()
            a.register()
        keys.enrol(store, self.agents.values())
        self.models = models
        self.tags = []

    def step(self, *_):
        for name, a in self.agents.items():
            if name not in self.offline:
                a.step()

    def controller(self) -> Controller:
        c = self.kit.controller(self.store, sleep=self.step)
        c.registry.tag = lambda rec: self.tags.append((rec["name"], rec["state"]))
        c.registry.set_alias = lambda rec, alias: self.tags.append((rec["name"], f"alias:{alias}"))
        return c

    def record(self, name, model_path, golden_path=None, **cfg):
        """A prepared rollout record and its signed target (what prepare() makes from MLflow)."""
        cfg = WaveRolloutConfig.from_dict({"poll_interval_s": 0.01, "wave_timeout_s": 5.0, **cfg})
        artifact = upload(self.store, model_path)
        target = {"artifact": artifact, "engines": {}, "health_check": golden_for(golden_path or model_path),
                  "model": {"name": "m", "version": name, "alias": None, "run_id": None, "uri": f"models:/m/{name}"},
                  "release": self.kit.release(artifact, name="m", version=name)}
        self.kit.controller(self.store).put_target(target)
        return {"name": name, "fleet": "f", "state": "pending", "generation": 1, "rollout_uid": f"uid-{name}", **target,
                "config": cfg.to_dict(), "waves": [],
                "devices": {}, "abort_requested": None, "reason": None, "history": []}

    def running(self, dev):
        link = self.agents[dev].state_dir / "current"
        return sha256_file(link / "model.onnx") if link.exists() else None


@pytest.fixture
def fleet(store, keys, tmp_path):
    models = [make_onnx(tmp_path / f"v{i}.onnx", seed=i) for i in range(3)]
    return lambda n: Fleet(store, keys, tmp_path, n, models)


def test_good_rollout_reaches_every_device_and_moves_aliases(fleet, capsys):
    f = fleet(4)
    rec = f.controller().waves.run(f.record("r1", f.models[0], waves=[25, 50, 100]))
    assert rec["state"] == "succeeded"
    err = capsys.readouterr().err  # the waves' progress, as the terminal shows it
    assert "rollout r1: wave 1/3 sent to 1 device(s)" in err
    assert "rollout r1: wave 3/3: 2 of 2 reported, 0 failed, 0 remaining" in err
    assert [len(w["devices"]) for w in rec["waves"]] == [1, 1, 2]
    assert {d["outcome"] for d in rec["devices"].values()} == {"committed"}
    assert all(f.running(d) == rec["artifact"]["sha256"] for d in f.agents)
    assert ("r1", "alias:edge-canary") in f.tags and ("r1", "alias:edge-stable") in f.tags
    assert ("r1", "succeeded") in f.tags


def test_bad_canary_aborts_rolls_back_and_later_waves_are_never_touched(fleet):
    f = fleet(4)
    c = f.controller()
    c.waves.run(f.record("r1", f.models[0], waves=[100]))
    v1 = c.get("r1")["artifact"]["sha256"]
    seqs_before = {d: f.store.get_json(FleetKeys("f").manifest(d))[0]["signed"]["sequence"] for d in f.agents}
    bad = f.record("r2", f.models[1], golden_path=f.models[0], waves=[25, 50, 100], max_failure_pct=10)
    rec = c.waves.run(bad)
    assert rec["state"] == "aborted" and "1 of 1 reported devices failed" in rec["reason"]
    canary = rec["waves"][0]["devices"][0]
    assert list(rec["devices"]) == [canary]
    assert rec["devices"][canary]["outcome"] == "failed"
    assert ("r2", "alias:edge-canary") not in f.tags and ("r2", "alias:edge-stable") not in f.tags
    for d in f.agents:
        man = f.store.get_json(FleetKeys("f").manifest(d))[0]["signed"]
        if d == canary:
            assert man["rollout_id"] == "r2" and man["action"] == "rollback"
            assert man["sequence"] == seqs_before[d] + 2 and man["artifact"]["sha256"] == v1
        else:
            assert man["sequence"] == seqs_before[d] and man["rollout_id"] == "r1"
    f.step()
    assert all(f.running(d) == v1 for d in f.agents)


def test_silent_device_counts_as_failed_and_catches_up_later(fleet):
    f = fleet(3)
    c = f.controller()
    order = wave_plan("r1", sorted(f.agents), [34, 100])
    late = order[1][-1]
    f.offline.add(late)
    rec = c.waves.run(f.record("r1", f.models[0], waves=[34, 100], max_failure_pct=50, wave_timeout_s=0.5))
    assert rec["state"] == "succeeded"
    assert rec["devices"][late]["outcome"] == "silent"
    assert f.running(late) is None
    f.offline.clear()
    f.step()
    assert f.running(late) == rec["artifact"]["sha256"]


def test_too_many_silent_devices_abort_and_roll_back_all_touched(fleet):
    f = fleet(2)
    c = f.controller()
    f.offline.update(f.agents)
    rec = c.waves.run(f.record("r1", f.models[0], waves=[100], wave_timeout_s=0.3))
    assert rec["state"] == "aborted" and "2 of 2" in rec["reason"]
    for d in f.agents:  # no previous model: the rollback withdraws it
        assert f.store.get_json(FleetKeys("f").manifest(d))[0]["signed"]["action"] == "withdraw"


def test_abort_request_stops_a_running_rollout(fleet):
    f = fleet(2)
    c = f.controller()
    order = wave_plan("r1", sorted(f.agents), [50, 100])
    f.offline.add(order[1][0])  # keeps wave 1 waiting
    rec = f.record("r1", f.models[0], waves=[50, 100], wave_timeout_s=30)
    c.records.save(rec)

    def sleep(_):
        f.step()
        cur = c.get("r1")
        if cur["state"] == "running" and any(w["state"] == "running" and w["index"] == 1 for w in cur["waves"]):
            Controller(f.store, "f", root=f.kit.root).abort("r1", "operator said stop")  # the lock holder rolls back

    c.ctx.sleep = sleep
    c.acquire_lock("r1", 60)  # as create() does: the abort below finds the rollout owned
    rec = c.waves.run(rec)
    assert rec["state"] == "aborted" and rec["reason"] == "operator said stop"
    # stopped by the request, not by waiting out wave_timeout_s for the offline device
    assert all(d["outcome"] != "silent" for d in rec["devices"].values())
    f.offline.clear()
    f.step()
    assert all(f.running(d) is None for d in f.agents)


def test_lock_is_create_once_and_an_expired_one_is_taken_over(store, keys):
    a, b = keys.controller(store), keys.controller(store)
    a.acquire_lock("r1", ttl_s=60)
    with pytest.raises(FleetError, match="locked by rollout 'r1'"):
        b.acquire_lock("r2", ttl_s=60)
    a.release_lock()
    b.acquire_lock("r2", ttl_s=0.01)
    time.sleep(0.05)
    a.acquire_lock("r3", ttl_s=60)  # b's lock expired
    with pytest.raises(FleetError, match="lost the lock"):
        b.renew_lock("r2", ttl_s=60)


def test_promote_defaults_to_auto_and_is_checked():
    assert WaveRolloutConfig().promote == "auto"  # create/update keep going after the canary, as before
    cfg = WaveRolloutConfig.from_strings({"promote": "soak", "soak_s": "3600"})
    assert cfg.promote == "soak" and cfg.soak_s == 3600.0
    assert WaveRolloutConfig.from_dict({}).to_dict()["promote"] == "auto"  # records written before promote existed
    with pytest.raises(ConfigError, match="promote: got sometimes; expected auto, soak or approval"):
        WaveRolloutConfig.from_strings({"promote": "sometimes"})
    with pytest.raises(ConfigError, match="soak_s"):
        WaveRolloutConfig.from_strings({"soak_s": "-1"})


def test_auto_promotion_moves_edge_canary_then_edge_stable_without_stopping(fleet):
    f = fleet(3)
    rec = f.controller().waves.run(f.record("r1", f.models[0], waves=[30, 100]))
    assert rec["state"] == "succeeded" and "promotion" not in rec
    assert [t for t in f.tags if t[1].startswith("alias:")] == [("r1", "alias:edge-canary"), ("r1", "alias:edge-stable")]
