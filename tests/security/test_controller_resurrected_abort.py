"""Finding 4: an aborted rollout stays aborted, whatever the store holds and whether or not MLflow answers.

A bucket writer copies rollout ``ra``'s record while it is pending; the operator aborts it
(``edgeslim fleet abort``), then rolls the same model version out as ``rb`` and aborts that too,
so MLflow's last end-of-rollout tag of the version names ``rb``. The writer puts the copy back and
deletes the abort request. ``edgeslim fleet reconcile`` (the CronJob, a subprocess) must not resume
``ra``:

- with MLflow down: the controller's signed state records ``ra``'s end by its rollout id;
- with that state deleted too (nothing in the store remembers the end) and MLflow up: MLflow's end
  tag of ``ra``'s rollout id, which ``rb``'s end did not overwrite, says it ended;
- with the state deleted and MLflow down: nothing can verify the record, so nothing is acted on.

Each refusal is one line in the log, never a traceback; the device never gets the aborted model.
Real RGW store, real ``mlflow server``, a real agent process, real controller processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import free_port, make_onnx

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")
STATE = f"{K.base}/controller-state.json"


def test_an_aborted_rollout_put_back_is_never_resumed(rgw, s3_url, s3_store, keys, agents, register_edge_model,
                                                      fleet_mlflow, tmp_path):
    dev = agents("p0", ORIN)
    v2, sha2 = register_edge_model("sec-resurrect", make_onnx(tmp_path / "v2.onnx", seed=52))
    c = keys.controller(s3_store)
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "60"})

    def cli(command, *args, mlflow_up=True):
        env = dict(os.environ)
        if not mlflow_up:  # nothing listens there: MLflow is down
            env.update(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                       MLFLOW_HTTP_REQUEST_TIMEOUT="10")
        out = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", command, "lab", *args, "--store", s3_url,
                              "--endpoint-url", rgw["S3_ENDPOINT_URL"], "--signing-key", str(keys.paths["fleet"][0]),
                              "--root", str(keys.root_path)], capture_output=True, text=True, timeout=300, env=env)
        assert "Traceback" not in out.stderr, out.stderr
        return out

    assert c.create("ra", f"models:/sec-resurrect/{v2}", cfg, wait=False)["state"] == "pending"
    copy = s3_store.get(K.rollout("ra")).data  # the writer keeps this validly signed version
    assert cli("abort", "ra").returncode == 0
    assert c.get("ra")["state"] == "aborted"
    # The same version again, as rb, aborted too: the version's last end tag in MLflow now names rb.
    assert c.create("rb", f"models:/sec-resurrect/{v2}", cfg, wait=False)["state"] == "pending"
    assert cli("abort", "rb").returncode == 0

    s3_store.put(K.rollout("ra"), copy)
    s3_store.delete(K.abort_request("ra"))

    def refused(out, why):
        assert out.returncode == 1, (out.returncode, out.stderr)
        lines = [ln for ln in out.stderr.splitlines() if re.search(r"\bra\b", ln)]
        assert len(lines) == 1 and why in lines[0], out.stderr
        assert not re.search(r"\bra\b", out.stdout), out.stdout  # nothing resumed

    # MLflow down: the controller's signed state says ra ended.
    refused(cli("reconcile", mlflow_up=False), "(a replay)")
    # The state deleted as well (the store remembers nothing): MLflow's tag for ra's rollout id says so.
    s3_store.delete(STATE)
    refused(cli("reconcile"), "MLflow recorded this generation")
    # Both gone: nothing verifies the record, nothing is acted on.
    s3_store.delete(STATE)
    refused(cli("reconcile", mlflow_up=False), "cannot check its end in MLflow")

    manifest = s3_store.get_json(K.manifest("p0"))
    assert manifest is None or manifest[0]["signed"]["artifact"] is None or \
        manifest[0]["signed"]["artifact"]["sha256"] != sha2, manifest
    assert dev.running_sha() != sha2
    assert s3_store.get(K.lock) is None
