"""A registry webhook on an alias change records a request; the controller Job rolls it out.

Real ``mlflow server`` delivering webhooks, the keyless receiver as a real ``edgeslim fleet
webhook`` process, ``edgeslim fleet reconcile --follow`` as a real process, agents on RGW.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
from mlflow import MlflowClient

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy.requests import pending_requests

pytestmark = pytest.mark.slow


def _start_receiver(s3_url, endpoint, secret, *models):
    env = {k: v for k, v in os.environ.items() if k != "EDGESLIM_FLEET_SIGNING_KEY"}  # the pod holds no key
    env["EDGESLIM_WEBHOOK_SECRET"] = secret
    args = [a for m in models for a in ("--model", m)]
    proc = subprocess.Popen([sys.executable, "-m", "edgeslim", "fleet", "webhook", "lab", "--store", s3_url,
                             "--endpoint-url", endpoint, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
    assert m, f"the receiver did not start: {''.join(lines)[-2000:]}"
    return proc, int(m.group(1)), lines


def _reconcile(s3_url, endpoint, keys, *follow):
    """The controller Job: it, not the receiver, holds the fleet key and the root."""
    args = [a for m in follow for a in ("--follow", m)]
    out = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", "reconcile", "lab", "--store", s3_url,
                          "--endpoint-url", endpoint, "--signing-key", str(keys.paths["fleet"][0]),
                          "--root", str(keys.root_path), *args, "-C", "waves=100", "-C", "poll_interval_s=0.2",
                          "-C", "promote=auto", "--json"],  # webhook rollouts wait for approval unless told otherwise
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr


def test_alias_webhook_records_a_request_and_reconcile_rolls_it_out_once(
        fleet_mlflow, rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    endpoint = rgw["S3_ENDPOINT_URL"]
    dev = agents("w0", "orin-sm87-jp6.1-trt10.3")  # registered and enrolled
    version, sha = register_edge_model("fleet-hook", make_onnx(tmp_path / "v1.onnx", seed=31), alias="staging")
    other, _ = register_edge_model("fleet-hook-other", make_onnx(tmp_path / "o1.onnx", seed=32), alias="staging")
    secret = uuid.uuid4().hex
    proc, port, lines = _start_receiver(s3_url, endpoint, secret, "fleet-hook")
    client = MlflowClient()
    hook = client.create_webhook(name=f"edgeslim-{uuid.uuid4().hex[:6]}", url=f"http://127.0.0.1:{port}/",
                                 events=["model_version_alias.created"], secret=secret)
    controller = keys.controller(s3_store)
    try:
        time.sleep(1.5)  # outlive the server's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1 in the fixture)
        client.set_registered_model_alias("fleet-hook", "edge-candidate", version)
        reqs = wait_for(lambda: pending_requests(s3_store, "lab"), 60, "the request recorded by the receiver")
        assert [(r["model"], r["version"], r["alias"]) for r in reqs] == [("fleet-hook", version, "edge-candidate")]
        # The receiver recorded a request and nothing else: no rollout, no manifest.
        assert controller.list() == [] and dev.running_sha() is None
        # A model this fleet does not follow: delivered, verified, ignored.
        client.set_registered_model_alias("fleet-hook-other", "edge-candidate", other)
        wait_for(lambda: any("ignored: model fleet-hook-other is not followed" in ln for ln in lines), 60,
                 "the receiver to ignore the other model")
        assert len(pending_requests(s3_store, "lab")) == 1

        done, err = _reconcile(s3_url, endpoint, keys, "fleet-hook")
        assert done == [{"name": f"fleet-hook-v{version}", "state": "succeeded"}], err
        wait_for(lambda: dev.running_sha() == sha, 90, "the requested rollout to reach the device")
        assert pending_requests(s3_store, "lab") == []
        # The same alias set again: delivered, recorded, and idempotent (no second rollout).
        client.set_registered_model_alias("fleet-hook", "edge-candidate", version)
        wait_for(lambda: pending_requests(s3_store, "lab"), 60, "the second request")
        done, err = _reconcile(s3_url, endpoint, keys, "fleet-hook")
        assert done == [] and "already-rolled-out" in err
        assert [r["name"] for r in controller.list()] == [f"fleet-hook-v{version}"]
        assert pending_requests(s3_store, "lab") == []
        assert proc.poll() is None
    finally:
        client.delete_webhook(hook.webhook_id)
        proc.terminate()
        proc.wait(10)
