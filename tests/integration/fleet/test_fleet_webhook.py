"""A registry webhook on an alias change starts the rollout (real MLflow server delivering)."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy import signing
from edgeslim.deploy.controller import Controller, follow_alias
from edgeslim.deploy.store import FleetKeys
from edgeslim.deploy.webhook import make_server

pytestmark = pytest.mark.slow


def test_alias_webhook_starts_a_rollout_once(fleet_mlflow, s3_store, keys, agents, register_edge_model, tmp_path):
    dev = agents("w0", "orin-sm87-jp6.1-trt10.3")
    wait_for(lambda: s3_store.get_json(FleetKeys("lab").registration("w0")), 30, "registration")
    version, sha = register_edge_model("fleet-hook", make_onnx(tmp_path / "v1.onnx", seed=31), alias="staging")
    controller = Controller(s3_store, "lab", signing_key=signing.load_private_key(keys[0]))
    started = []

    def on_alias(model, ver, alias):
        started.append((model, ver))
        follow_alias(controller, model, alias, None, {"waves": "100", "poll_interval_s": "0.2"})

    secret = uuid.uuid4().hex
    server = make_server("127.0.0.1", 0, secret, "edge-candidate", on_alias)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = MlflowClient()
    hook = client.create_webhook(name=f"edgeslim-{uuid.uuid4().hex[:6]}",
                                 url=f"http://127.0.0.1:{server.server_port}/",
                                 events=["model_version_alias.created"], secret=secret)
    try:
        import time

        time.sleep(1.5)  # outlive the server's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1 in conftest)
        client.set_registered_model_alias("fleet-hook", "edge-candidate", version)
        wait_for(lambda: dev.running_sha() == sha, 90, "the webhook-started rollout to reach the device")
        rec = wait_for(lambda: (s3_store.get_json(FleetKeys("lab").rollout(f"fleet-hook-v{version}")) or [{}])[0]
                       .get("state") == "succeeded", 60, "rollout succeeded")
        assert rec and started == [("fleet-hook", version)]
        # The same alias set again: delivered, verified, and idempotent (no second rollout).
        client.set_registered_model_alias("fleet-hook", "edge-candidate", version)
        wait_for(lambda: len(started) == 2, 30, "second delivery")
        assert [r["name"] for r in controller.list()] == [f"fleet-hook-v{version}"]
    finally:
        client.delete_webhook(hook.webhook_id)
        server.shutdown()
