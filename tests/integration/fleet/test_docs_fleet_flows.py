"""docs/fleet-rollout.md and docs/promotion.md run as written: their blocks in one bash session (a
reader's terminal), against a real ``mlflow server``, Ceph RGW as the fleet store and two real
``edgeslim-agent`` processes the page itself starts.

The reader has a gated candidate registered as ``digits-teacher-edge@edge-candidate`` (what
``edgeslim run`` leaves): here a small ONNX taking the digits' ``1x8x8`` samples, logged with its
signature and a passed gate verdict, as the register step logs it. The walk: keys, agents, enrol,
release, roll out version 1 with ``mlflow deployments create``, ``mlflow deployments predict`` and
``edgeslim fleet predict``; then version 2 with ``promote=approval``: canary -> ``edgeslim fleet
approve`` -> stable on both devices with no further command; then the fleet's policy and a withdraw.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.doc_shell import DocShell
from tests.fleet_it_helpers import wait_for
from edgeslim.components.common.hashing import file_sha256
from edgeslim.deploy.store import FleetKeys

pytestmark = pytest.mark.slow

MODEL = "digits-teacher-edge"
DEVICES = ("orin-001", "orin-002")


def _digits_onnx(path: Path, seed: int) -> Path:
    """logits = Flatten(x) @ W: a model taking (N, 1, 8, 8), as the digits classifiers do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "W", "b"], ["logits"])],
        "digits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(10, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _register_candidate(path: Path) -> str:
    """As the register step leaves a gated candidate: signature, gate verdict, ``edge-candidate``; no release
    statement (the page signs it)."""
    import mlflow

    from edgeslim.components.register import onnx_signature
    from edgeslim.plugins import edge_flavor

    mlflow.set_experiment("docs-fleet")
    with mlflow.start_run():
        info = edge_flavor.log_model(path, "model", signature=onnx_signature(path),
                                     metadata={"gate": {"passed": True, "summary": "docs walk-through"}})
    version = str(mlflow.register_model(info.model_uri, MODEL).version)
    MlflowClient().set_registered_model_alias(MODEL, "edge-candidate", version)
    return version


def _record(store, name="r1") -> dict:
    got = store.get_json(FleetKeys("lab").rollout(name))
    return got[0]["signed"] if got else {}


def _running(work: Path, dev: str) -> str | None:
    model = work / "devices" / dev / "current" / "model.onnx"
    return file_sha256(model) if model.exists() else None


def test_fleet_rollout_and_canary_approve_stable_run_as_documented(fleet_mlflow, rgw, s3_url, s3_store, tmp_path,
                                                                   record_property):
    import onnxruntime as ort

    work = tmp_path / "reader"
    env = {k: v for k, v in os.environ.items() if k not in ("EDGESLIM_FLEET_SIGNING_KEY", "EDGESLIM_FLEET_ROOT",
                                                            "EDGESLIM_RELEASE_KEY", "EDGESLIM_APPROVER_KEY")}
    env.update(MLFLOW_TRACKING_URI=fleet_mlflow, EDGESLIM_FLEET_STORE=s3_url,
               EDGESLIM_S3_ENDPOINT_URL=rgw["S3_ENDPOINT_URL"], EDGESLIM_HOME=str(tmp_path / "home"))
    v1_path, v2_path = _digits_onnx(tmp_path / "v1.onnx", 1), _digits_onnx(tmp_path / "v2.onnx", 2)
    sha1, sha2 = file_sha256(v1_path), file_sha256(v2_path)
    v1 = _register_candidate(v1_path)
    client = MlflowClient(fleet_mlflow)
    sh = DocShell(work, env)
    keys = FleetKeys("lab")
    try:
        # --- Fleet rollout: keys, two agents, enrol, release, create, get
        start = time.monotonic()
        sh.run("docs/fleet-rollout.md", "keys")
        assert sh.exported("EDGESLIM_FLEET_ROOT") == str(work / "root.json")
        assert sh.exported("EDGESLIM_APPROVER_KEY") == str(work / "keys" / "approver" / "approver.key")
        sh.run("docs/fleet-rollout.md", "agents")
        wait_for(lambda: {k.split("/")[-2] for k in s3_store.list(keys.devices_prefix)
                          if k.endswith("registration.json")} >= set(DEVICES), 120, "both agents to register")
        out = sh.run("docs/fleet-rollout.md", "enrol")
        assert all(d in out.stdout for d in DEVICES)
        sh.run("docs/fleet-rollout.md", "release")
        assert "edgeslim.release" in client.get_model_version(MODEL, v1).tags
        out = sh.run("docs/fleet-rollout.md", "create")
        assert "r1" in out.stdout + out.stderr
        rec = wait_for(lambda: _record(s3_store).get("state") in ("succeeded", "aborted", "failed")
                       and _record(s3_store), 300, "the background controller to finish r1")
        assert rec["state"] == "succeeded", rec.get("reason")
        assert [_running(work, d) for d in DEVICES] == [sha1, sha1]
        out = sh.run("docs/fleet-rollout.md", "get")
        assert "state: succeeded" in out.stdout and "r1" in out.stdout.split("state: succeeded", 1)[1]
        rollout_s = time.monotonic() - start

        # --- mlflow deployments predict and edgeslim fleet predict
        start = time.monotonic()
        out = sh.run("docs/fleet-rollout.md", "predict")
        from sklearn.datasets import load_digits

        x = (load_digits().images[:2, None] / 16).astype(np.float32)
        want = ort.InferenceSession(str(v1_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        by_mlflow = json.loads(out.stdout.lstrip().splitlines()[0])  # `mlflow deployments predict`: one line
        np.testing.assert_allclose(by_mlflow["logits"], want, rtol=1e-5, atol=1e-5)
        assert by_mlflow["backend"].startswith("onnxruntime:")
        assert "logits" in out.stdout.lstrip().split("\n", 1)[1]  # then `edgeslim fleet predict`'s
        predict_s = time.monotonic() - start

        # --- Promotion: version 2, canary -> approve -> stable, nothing else run
        start = time.monotonic()
        v2 = _register_candidate(v2_path)
        sh.run("docs/promotion.md", "release")
        sh.run("docs/promotion.md", "rollout")
        rec = wait_for(lambda: _record(s3_store).get("generation") == 2 and _record(s3_store).get("state") in (
            "awaiting-approval", "aborted", "failed", "succeeded") and _record(s3_store), 300, "the canary wave")
        assert rec["state"] == "awaiting-approval", rec.get("reason")
        aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
        assert aliases["edge-canary"] == v2 and aliases["edge-stable"] == v1
        assert sorted(_running(work, d) for d in DEVICES) == sorted([sha1, sha2])  # one canary
        out = sh.run("docs/promotion.md", "get-waiting")
        assert "state: awaiting-approval" in out.stdout and "'approval': None" in out.stdout
        assert "edgeslim fleet approve lab r1" in out.stdout
        out = sh.run("docs/promotion.md", "approve")
        rec = _record(s3_store)  # the command has returned: the rollout has ended
        assert rec["state"] == "succeeded", (rec.get("reason"), out.stderr[-2000:])
        assert rec["promotion"]["approval"]["by"] and [_running(work, d) for d in DEVICES] == [sha2, sha2]
        out = sh.run("docs/promotion.md", "aliases")
        assert "state: succeeded" in out.stdout
        assert f"'edge-canary': '{v2}'" in out.stdout and f"'edge-stable': '{v2}'" in out.stdout, out.stdout
        approve_s = time.monotonic() - start

        sh.run("docs/promotion.md", "policy")
        assert s3_store.get_json(keys.base + "/policy.json")[0]["signed"]["auto_promote"] is False

        # --- withdraw: both devices go back to what they ran before generation 2
        sh.run("docs/fleet-rollout.md", "delete")
        assert _record(s3_store)["state"] == "withdrawn"
        wait_for(lambda: [_running(work, d) for d in DEVICES] == [sha1, sha1], 120, "both devices back on v1")
    finally:
        sh.close()
    for name, seconds in (("fleet_rollout_s", rollout_s), ("predict_s", predict_s),
                          ("canary_approve_stable_s", approve_s)):
        record_property(name, round(seconds, 1))
    print(f"\nas documented: rollout to two agents {rollout_s:.0f} s, predict (both CLIs) {predict_s:.0f} s, "
          f"canary -> approve -> stable {approve_s:.0f} s; blocks: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in sh.times.items()))
