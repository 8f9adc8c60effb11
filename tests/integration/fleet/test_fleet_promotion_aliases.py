"""The alias contract end to end: edge-candidate -> canary wave -> edge-canary -> approval -> edge-stable.

Real ``mlflow server`` (the aliases), Ceph RGW (the store), agents as processes, and the
``edgeslim fleet`` CLI as subprocesses for the approver and for the CronJob's ``follow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from mlflow import MlflowClient

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy.controller import WaveRolloutConfig, wave_plan
from edgeslim.deploy.store import FleetKeys

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
FAST = {"poll_interval_s": "0.2", "wave_timeout_s": "60"}


def _env(rgw, s3_url, keys, *, with_key=True):
    env = dict(os.environ, EDGESLIM_FLEET_STORE=s3_url, EDGESLIM_S3_ENDPOINT_URL=rgw["S3_ENDPOINT_URL"],
               EDGESLIM_FLEET_ROOT=str(keys.root_path))
    env.pop("EDGESLIM_FLEET_SIGNING_KEY", None)
    if with_key:
        env["EDGESLIM_FLEET_SIGNING_KEY"] = str(keys.paths["fleet"][0])
    return env


def _fleet(env, *args):
    out = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", *args], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"edgeslim fleet {args[0]} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _state(store, name):
    got = store.get_json(FleetKeys("lab").rollout(name))
    return got[0]["signed"]["state"] if got else None


def test_edge_stable_moves_only_after_approve_and_an_abort_puts_edge_canary_back(
        rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    names = ["p0", "p1", "p2"]
    devs = {n: agents(n, ORIN) for n in names}
    client = MlflowClient()

    def aliases():
        return {k: str(v) for k, v in client.get_registered_model("fleet-promo").aliases.items()}

    # v1 everywhere, promoted at once (promote=auto, the default of create).
    v1, sha1 = register_edge_model("fleet-promo", make_onnx(tmp_path / "v1.onnx", seed=41))
    c = keys.controller(s3_store)
    assert c.create("r1", "models:/fleet-promo@edge-candidate",
                    WaveRolloutConfig.from_strings({"waves": "100", **FAST}))["state"] == "succeeded"
    assert aliases() == {"edge-candidate": v1, "edge-canary": v1, "edge-stable": v1}

    # v2 with promote=approval, run by a controller that waits (`create --wait`).
    v2, sha2 = register_edge_model("fleet-promo", make_onnx(tmp_path / "v2.onnx", seed=42))
    canary = wave_plan("r2", names, [30, 100])[0]
    assert len(canary) == 1
    result = {}

    def run():
        try:
            result["rec"] = keys.controller(s3_store).create("r2", "models:/fleet-promo@edge-candidate",
                                                             WaveRolloutConfig.from_strings(
                                                                 {"waves": "30,100", "promote": "approval", **FAST}))
        except Exception as exc:  # surfaced by the asserts below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_for(lambda: _state(s3_store, "r2") == "awaiting-approval", 120, "r2 to await approval")
        assert aliases() == {"edge-candidate": v2, "edge-canary": v2, "edge-stable": v1}
        assert devs[canary[0]].running_sha() == sha2
        for n in names:
            if n not in canary:  # the later wave is not touched before the approval
                assert devs[n].running_sha() == sha1
                assert s3_store.get_json(FleetKeys("lab").manifest(n))[0]["signed"]["rollout_id"] == "r1"
        got = json.loads(_fleet(_env(rgw, s3_url, keys, with_key=False), "get", "lab", "r2", "--json").stdout)
        assert got["state"] == "awaiting-approval"
        assert "edgeslim fleet approve lab r2" in got["promotion"]["next"]
        assert aliases()["edge-stable"] == v1

        # The approver holds the approver key, not the fleet key: the signed approval is an object the
        # waiting controller reads.
        out = _fleet(dict(_env(rgw, s3_url, keys, with_key=False), EDGESLIM_APPROVER_KEY=str(keys.paths["approver"][0])),
                     "approve", "lab", "r2", "--by", "release-manager")
        assert "approved" in out.stderr
    finally:
        t.join(180)
    assert not t.is_alive() and "error" not in result, result
    rec = result["rec"]
    assert rec["state"] == "succeeded" and rec["promotion"]["approval"]["by"] == "release-manager"
    assert aliases() == {"edge-candidate": v2, "edge-canary": v2, "edge-stable": v2}
    wait_for(lambda: all(d.running_sha() == sha2 for d in devs.values()), 60, "every device on v2")

    # v3 as the webhook's CronJob starts it (`follow`): no auto-promotion unless the fleet opted in,
    # and the Job does not sit on the approval: it leaves the rollout awaiting-approval.
    v3, sha3 = register_edge_model("fleet-promo", make_onnx(tmp_path / "v3.onnx", seed=43))
    env = _env(rgw, s3_url, keys)
    followed = json.loads(_fleet(env, "follow", "lab", "--json", "--model", "fleet-promo", "-C", "waves=30,100",
                                 *[f"-C{k}={v}" for k, v in FAST.items()]).stdout)
    name = f"fleet-promo-v{v3}"
    assert followed["name"] == name and followed["state"] == "awaiting-approval" and followed["promote"] == "approval"
    assert aliases() == {"edge-candidate": v3, "edge-canary": v3, "edge-stable": v2}
    canary3 = wave_plan(name, names, [30, 100])[0][0]
    assert devs[canary3].running_sha() == sha3

    # Aborted while awaiting approval: the canary goes back to v2, and so does edge-canary.
    aborted = json.loads(_fleet(env, "abort", "lab", name, "--reason", "not this one", "--json").stdout)
    assert aborted["state"] == "aborted" and aborted["reason"] == "not this one"
    assert aliases() == {"edge-candidate": v3, "edge-canary": v2, "edge-stable": v2}
    wait_for(lambda: all(d.running_sha() == sha2 for d in devs.values()), 60, "every device back on v2")
    tag = json.loads(client.get_model_version("fleet-promo", v3).tags["edgeslim.fleet.lab"])
    assert tag["state"] == "aborted"
