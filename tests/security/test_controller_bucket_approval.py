"""A bucket writer cannot approve: an approval must be signed by an approver key of the fleet's root.

A rollout with ``promote=approval`` waits after its canary wave. A bucket writer writes approvals
for exactly that rollout, generation and artifact: unsigned, signed by a key of their own, and
signed by the fleet (controller) key, which is not an approver's. ``edgeslim fleet reconcile`` (the
CronJob, a subprocess) refuses each on one line and the rollout keeps waiting, ``edge-stable``
unmoved. ``edgeslim fleet approve`` without the approver key is refused before anything is written;
with it (``EDGESLIM_APPROVER_KEY``), the rollout is promoted.
Real RGW store, real ``mlflow server``, a real agent process, real controller processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgeslim.deploy import signing, trust
from edgeslim.deploy.controller import WaveRolloutConfig, approval_key
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

K = FleetKeys("lab")


def test_only_an_approver_key_approves(rgw, s3_url, s3_store, keys, agents, register_edge_model, fleet_mlflow,
                                       tmp_path):
    from mlflow import MlflowClient

    dev = agents("a0")
    v1, sha1 = register_edge_model("sec-approval", make_onnx(tmp_path / "v1.onnx", seed=61))
    c = keys.controller(s3_store)
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "60",
                                          "promote": "approval"})
    rec = c.create("r1", f"models:/sec-approval/{v1}", cfg, block=False)
    assert rec["state"] == "awaiting-approval"
    wait_for(lambda: dev.running_sha() == sha1, 60, "the canary on v1")

    def cli(command, *args, env=None):
        out = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", command, "lab", *args, "--store", s3_url,
                              "--endpoint-url", rgw["S3_ENDPOINT_URL"], "--signing-key", str(keys.paths["fleet"][0]),
                              "--root", str(keys.root_path)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **(env or {})})
        assert "Traceback" not in out.stderr, out.stderr
        return out

    body = {"type": "edgeslim.fleet.approval", "fleet": "lab", "rollout": "r1", "generation": 1,
            "rollout_uid": rec["rollout_uid"], "artifact_sha256": sha1, "canary_done_at": rec["promotion"]["since"],
            "model": {"name": "sec-approval", "version": v1}, "by": "mallory", "at": 0.0}
    own = signing.load_private_key(signing.generate_keypair(tmp_path / "mallory", role="approver")[0])
    for forged in (body, trust.sign_with(body, [own]), trust.sign_with(body, [keys.fleet_key])):
        s3_store.put_json(approval_key(K, "r1"), forged)
        out = cli("reconcile")
        assert out.returncode == 0, out.stderr  # still waiting, as the CronJob leaves it
        lines = [ln for ln in out.stderr.splitlines() if "approval" in ln]
        assert len(lines) == 1 and "approval refused" in lines[0], out.stderr
        assert c.get("r1")["state"] == "awaiting-approval"
    assert "edge-stable" not in MlflowClient().get_registered_model("sec-approval").aliases

    out = cli("approve", "r1", env={"EDGESLIM_APPROVER_KEY": ""})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "approver key" in out.stderr, out.stderr
    out = cli("approve", "r1", env={"EDGESLIM_APPROVER_KEY": str(keys.paths["approver"][0])})
    assert out.returncode == 0, out.stderr
    assert c.get("r1")["state"] == "succeeded"
    assert str(MlflowClient().get_registered_model("sec-approval").aliases["edge-stable"]) == v1
