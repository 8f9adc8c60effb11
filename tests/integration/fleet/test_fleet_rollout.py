"""Rollouts end to end: MLflow server, Ceph RGW, agents as processes, the real CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.fleet_it_helpers import make_onnx, run_onnx, wait_for
from edgeslim.components.common.errors import FleetError
from edgeslim.deploy.controller import WaveRolloutConfig, wave_plan
from edgeslim.deploy.store import FleetKeys

pytestmark = pytest.mark.slow

ORIN, XAVIER = "orin-sm87-jp6.1-trt10.3", "xavier-sm72-jp5.1-trt8.5"


def _env(rgw, s3_url, keys):
    return dict(os.environ, EDGESLIM_FLEET_STORE=s3_url, EDGESLIM_S3_ENDPOINT_URL=rgw["S3_ENDPOINT_URL"],
                EDGESLIM_FLEET_SIGNING_KEY=str(keys.paths["fleet"][0]), EDGESLIM_FLEET_ROOT=str(keys.root_path))


def _mlflow_cli(env, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "mlflow", "deployments", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlflow deployments {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _registered(store, fleet, n):
    return len([k for k in store.list(FleetKeys(fleet).devices_prefix) if k.endswith("registration.json")]) >= n


def _controller(store, keys, fleet="lab"):
    return keys.controller(store)


FAST = {"poll_interval_s": "0.2", "wave_timeout_s": "60"}


def test_good_rollout_through_mlflow_deployments(rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    devs = [agents("d0", ORIN), agents("d1", ORIN), agents("d2", XAVIER), agents("d3", XAVIER)]
    wait_for(lambda: _registered(s3_store, "lab", 4), 30, "4 registrations")
    version, sha = register_edge_model("fleet-good", make_onnx(tmp_path / "v1.onnx", seed=1))
    # as the pipeline's report task leaves it on a version compressed on a cluster
    MlflowClient().set_model_version_tag("fleet-good", version, "edgeslim.kfp_run_id", "run-7f3e")
    env = _env(rgw, s3_url, keys)
    out = _mlflow_cli(env, "create", "-t", "edge:/lab", "--name", "r1", "-m", "models:/fleet-good@edge-candidate",
                      "-C", "waves=25,50,100", "-C", "max_failure_pct=10", "-C", "poll_interval_s=0.2",
                      "-C", "wave_timeout_s=60", "-C", "wait=true")
    assert all(d.running_sha() == sha for d in devs)
    rec = s3_store.get_json(FleetKeys("lab").rollout("r1"))[0]["signed"]  # the fleet key signs records
    assert rec["state"] == "succeeded" and [len(w["devices"]) for w in rec["waves"]] == [1, 1, 2]
    client = MlflowClient()
    aliases = client.get_registered_model("fleet-good").aliases
    assert str(aliases["edge-canary"]) == version and str(aliases["edge-stable"]) == version
    tag = json.loads(client.get_model_version("fleet-good", version).tags["edgeslim.fleet.lab"])
    assert tag["state"] == "succeeded" and tag["devices"] == 4 and tag["failed"] == 0
    assert tag["kfp_run_id"] == "run-7f3e" and rec["model"]["kfp_run_id"] == "run-7f3e"  # the chain, linked

    got = _mlflow_cli(env, "get", "-t", "edge:/lab", "--name", "r1")
    assert "state: succeeded" in got.stdout and sha[:12] in got.stdout
    # list and help through the Python client (each `mlflow` CLI start costs seconds here).
    from mlflow.deployments import get_deploy_client

    os.environ.update(EDGESLIM_FLEET_STORE=s3_url, EDGESLIM_S3_ENDPOINT_URL=rgw["S3_ENDPOINT_URL"],
                      EDGESLIM_FLEET_ROOT=str(keys.root_path))
    try:
        listed = get_deploy_client("edge:/lab").list_deployments()
    finally:
        for k in ("EDGESLIM_FLEET_STORE", "EDGESLIM_S3_ENDPOINT_URL", "EDGESLIM_FLEET_ROOT"):
            os.environ.pop(k)
    assert [(d["name"], d["state"]) for d in listed] == [("r1", "succeeded")]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (tmp_path / "in.json").write_text(json.dumps(x.tolist()))
    pred = _mlflow_cli(env, "predict", "-t", "edge:/lab", "--name", "r1", "--input-path", str(tmp_path / "in.json"))
    y = json.loads(pred.stdout.strip().splitlines()[-1])["y"]
    np.testing.assert_allclose(y, run_onnx(tmp_path / "v1.onnx", x), rtol=1e-5)
    from edgeslim.plugins.mlflow_deploy import target_help

    assert "max_failure_pct" in target_help() and "predict" in target_help()

    # Credentials appear nowhere: CLI output, agent logs, MLflow tags and params, store objects.
    secrets = [rgw["AWS_SECRET_ACCESS_KEY"], rgw["AWS_ACCESS_KEY_ID"]]
    texts = [out.stdout, out.stderr, got.stdout, got.stderr]
    for d in devs:
        d.stop()
        texts.append(d.log_path.read_text())
    for mv in client.search_model_versions("name='fleet-good'"):
        texts.append(json.dumps(mv.tags))
    for run in client.search_runs([client.get_experiment_by_name("fleet-tests").experiment_id]):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for key in s3_store.list(""):
        if key.endswith(".json"):
            texts.append(s3_store.get(key).data.decode())
    blob = "\n".join(texts)
    assert len(blob) > 1000
    for s in secrets:
        assert s not in blob


def test_offline_device_counts_as_silent_and_catches_up(rgw, s3_store, keys, agents, register_edge_model, tmp_path):
    names = ["a0", "a1", "a2"]
    late = wave_plan("r1", names, [34, 100])[-1][-1]
    procs = {}
    for n in names:
        if n == late:
            procs[n] = agents(n, ORIN, start=False).start("--once")  # registers, then goes offline
        else:
            procs[n] = agents(n, ORIN)
    wait_for(lambda: _registered(s3_store, "lab", 3), 30, "3 registrations")
    procs[late].proc.wait(30)
    keys.controller(s3_store).enrol(late)
    _, sha = register_edge_model("fleet-offline", make_onnx(tmp_path / "v1.onnx", seed=2))
    c = _controller(s3_store, keys)
    rec = c.create("r1", "models:/fleet-offline@edge-candidate", WaveRolloutConfig.from_strings(
        {"waves": "34,100", "max_failure_pct": "50", "poll_interval_s": "0.2", "wave_timeout_s": "4"}))
    assert rec["state"] == "succeeded"
    assert rec["devices"][late]["outcome"] == "silent"
    assert procs[late].running_sha() is None
    procs[late].start()  # back online
    wait_for(lambda: procs[late].running_sha() == sha, 60, "the offline device to catch up")
    st = wait_for(lambda: (s3_store.get_json(FleetKeys("lab").status(late)) or [{"signed": {}}])[0]["signed"].get("last"), 30, "status")
    assert st["result"] == "committed" and st["rollout_id"] == "r1"


def test_bad_model_fails_canary_controller_aborts_later_waves_untouched(
        rgw, s3_store, keys, agents, register_edge_model, tmp_path):
    devs = {n: agents(n, ORIN) for n in ("b0", "b1", "b2")}
    wait_for(lambda: _registered(s3_store, "lab", 3), 30, "3 registrations")
    good = make_onnx(tmp_path / "good.onnx", seed=3)
    v1, sha1 = register_edge_model("fleet-bad", good)
    c = _controller(s3_store, keys)
    assert c.create("r1", "models:/fleet-bad@edge-candidate",
                    WaveRolloutConfig.from_strings({"waves": "100", **FAST}))["state"] == "succeeded"
    before = {n: s3_store.get_json(FleetKeys("lab").manifest(n))[0]["signed"]["sequence"] for n in devs}
    # v2's weights differ from the model its golden outputs were recorded on.
    v2, sha2 = register_edge_model("fleet-bad", make_onnx(tmp_path / "bad.onnx", seed=4), golden_from=good)
    rec = c.create("r2", "models:/fleet-bad@edge-candidate", WaveRolloutConfig.from_strings(
        {"waves": "30,60,100", "max_failure_pct": "10", **FAST}))
    assert rec["state"] == "aborted"
    canary = rec["waves"][0]["devices"][0]
    assert list(rec["devices"]) == [canary] and rec["devices"][canary]["outcome"] == "failed"
    assert "golden" in rec["devices"][canary]["reason"]
    assert devs[canary].saw("health check failed")
    for n in devs:
        signed = s3_store.get_json(FleetKeys("lab").manifest(n))[0]["signed"]
        if n == canary:
            assert signed["action"] == "rollback" and signed["sequence"] == before[n] + 2
            assert signed["artifact"]["sha256"] == sha1
        else:
            assert signed["sequence"] == before[n] and signed["rollout_id"] == "r1"
            assert not devs[n].saw("sequence 2")
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 30, "all devices on v1")
    client = MlflowClient()
    assert str(client.get_registered_model("fleet-bad").aliases["edge-stable"]) == v1
    tag = json.loads(client.get_model_version("fleet-bad", v2).tags["edgeslim.fleet.lab"])
    assert tag["state"] == "aborted" and tag["failed"] == 1


def test_second_controller_is_refused_by_the_lock_and_abort_rolls_back(
        rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    names = ["c0", "c1"]
    plan = wave_plan("r1", names, [50, 100])
    first, second = plan[0][0], plan[1][0]
    live = agents(first, ORIN)
    agents(second, ORIN, start=False).start("--once").proc.wait(30)  # registered, then silent
    keys.controller(s3_store).enrol(second)
    wait_for(lambda: _registered(s3_store, "lab", 2), 30, "2 registrations")
    _, sha = register_edge_model("fleet-lock", make_onnx(tmp_path / "v1.onnx", seed=5))
    result = {}

    def run():
        try:
            result["rec"] = _controller(s3_store, keys).create("r1", "models:/fleet-lock@edge-candidate",
                                                               WaveRolloutConfig.from_strings(
                                                                   {"waves": "50,100", "poll_interval_s": "0.2",
                                                                    "wave_timeout_s": "120"}))
        except Exception as exc:  # surfaced by the asserts below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    def second_wave_waiting():
        waves = ((s3_store.get_json(FleetKeys("lab").rollout("r1")) or [{"signed": {}}])[0]["signed"].get("waves")) or []
        return len(waves) == 2 and waves[1].get("state") == "running"

    wait_for(second_wave_waiting, 60, "wave 2 to be waiting")
    with pytest.raises(FleetError, match="locked by rollout 'r1'"):
        _controller(s3_store, keys).create("r2", "models:/fleet-lock@edge-candidate",
                                           WaveRolloutConfig.from_strings(FAST))
    env = _env(rgw, s3_url, keys)
    cli = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", "create", "lab", "r2",
                          "models:/fleet-lock@edge-candidate"], env=env, capture_output=True, text=True, timeout=900)
    assert cli.returncode == 2
    assert cli.stderr.strip().count("\n") == 0 and "locked by rollout 'r1'" in cli.stderr
    assert "Traceback" not in cli.stderr
    _mlflow_cli(env, "update", "-t", "edge:/lab", "--name", "r1", "-C", "action=abort")
    t.join(60)
    assert not t.is_alive() and "error" not in result
    assert result["rec"]["state"] == "aborted"
    wait_for(lambda: live.running_sha() is None, 30, "the canary to withdraw the model")
    assert s3_store.get_json(FleetKeys("lab").lock) is None  # released


def test_delete_withdraws_devices_to_their_previous_model(
        rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    devs = [agents("e0", ORIN), agents("e1", XAVIER)]
    wait_for(lambda: _registered(s3_store, "lab", 2), 30, "2 registrations")
    _, sha1 = register_edge_model("fleet-del", make_onnx(tmp_path / "v1.onnx", seed=6))
    c = _controller(s3_store, keys)
    c.create("r1", "models:/fleet-del@edge-candidate", WaveRolloutConfig.from_strings({"waves": "100", **FAST}))
    _, sha2 = register_edge_model("fleet-del", make_onnx(tmp_path / "v2.onnx", seed=7))
    assert c.create("r2", "models:/fleet-del@edge-candidate",
                    WaveRolloutConfig.from_strings({"waves": "50,100", **FAST}))["state"] == "succeeded"
    assert all(d.running_sha() == sha2 for d in devs)
    _mlflow_cli(_env(rgw, s3_url, keys), "delete", "-t", "edge:/lab", "--name", "r2")
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs), 60, "devices back on v1")
    assert s3_store.get_json(FleetKeys("lab").rollout("r2"))[0]["signed"]["state"] == "withdrawn"


def test_create_returns_at_once_and_an_aborted_rollout_fails_the_waiting_command(
        rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    """`mlflow deployments create` records the rollout and a detached controller runs it; `get`
    follows it. With -C wait=true the command runs it, and an abort fails it with the reason."""
    from mlflow.deployments import get_deploy_client

    devs = [agents("a0", ORIN), agents("a1", ORIN)]
    wait_for(lambda: _registered(s3_store, "lab", 2), 30, "2 registrations")
    good = make_onnx(tmp_path / "good.onnx", seed=8)
    _, sha = register_edge_model("fleet-async", good)
    env = dict(_env(rgw, s3_url, keys), EDGESLIM_HOME=str(tmp_path / "home"))
    out = _mlflow_cli(env, "create", "-t", "edge:/lab", "--name", "r1", "-m", "models:/fleet-async@edge-candidate",
                      "-C", "waves=50,100", "-C", "poll_interval_s=0.2", "-C", "wave_timeout_s=60")
    assert "deployment r1 is created" in out.stdout, out.stdout  # returned; the waves run elsewhere
    saved = {k: os.environ.get(k) for k in ("EDGESLIM_FLEET_STORE", "EDGESLIM_S3_ENDPOINT_URL", "EDGESLIM_FLEET_ROOT")}
    os.environ.update(EDGESLIM_FLEET_STORE=s3_url, EDGESLIM_S3_ENDPOINT_URL=rgw["S3_ENDPOINT_URL"],
                      EDGESLIM_FLEET_ROOT=str(keys.root_path))
    try:
        client = get_deploy_client("edge:/lab")
        got = wait_for(lambda: client.get_deployment("r1")["state"] in ("succeeded", "aborted", "failed")
                       and client.get_deployment("r1"), 180, "the background controller to finish")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert got["state"] == "succeeded" and got["reported"] == 2, got
    assert all(d.running_sha() == sha for d in devs)
    assert (tmp_path / "home" / "rollouts" / "lab.log").is_file()  # the detached controller's log

    register_edge_model("fleet-async", make_onnx(tmp_path / "bad.onnx", seed=9), golden_from=good)
    bad = _mlflow_cli(env, "update", "-t", "edge:/lab", "--name", "r1", "-m", "models:/fleet-async@edge-candidate",
                      "-C", "wait=true", check=False)
    assert bad.returncode != 0
    assert "rollout 'r1' aborted" in bad.stderr and "reported devices failed" in bad.stderr
    wait_for(lambda: all(d.running_sha() == sha for d in devs), 60, "devices back on the good model")
