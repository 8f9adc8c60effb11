"""docs/registry-trigger.md run as written: its blocks in bash, against a real ``mlflow server`` started
with the page's own settings (``fleet_mlflow_server`` runs the ``mlflow-server-settings`` block).

A reader's setup is there first: a watched model ``digits-teacher`` and a ``recipe.yaml``. Each new
version here is a small edge ONNX, so the compression the trigger starts stops at its preflight (the
version holds no PyTorch model) and records ``failed`` in the ledger at once: what this test checks is
the wiring (MLflow delivers a signed webhook over http, then over TLS with a certificate its Python
trusts, and the trigger queues the version and writes the ledger). A whole compression from a
webhook is tests/integration/test_trigger_from_registry.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.doc_shell import DocShell
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

MODEL = "digits-teacher"
STATES = ("submitted", "done", "rejected", "failed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _new_version(tmp_path: Path, seed: int) -> str:
    """A new version of the watched model (MLflow delivers ``model_version.created``)."""
    import mlflow

    from edgeslim.plugins import edge_flavor

    mlflow.set_experiment("docs-trigger")
    with mlflow.start_run():
        info = edge_flavor.log_model(make_onnx(tmp_path / f"m{seed}.onnx", seed=seed), "model", metadata={})
    return str(mlflow.register_model(info.model_uri, MODEL).version)


def _ledger(client, version: str) -> dict[str, str]:
    tags = client.get_model_version(MODEL, version).tags
    return {k: v for k, v in tags.items() if k.startswith("edgeslim.trigger.")}


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_registry_trigger_page_runs_as_written_over_http_and_tls(fleet_mlflow, mlflow_server_certifi, tmp_path,
                                                                       record_property):
    from mlflow import MlflowClient

    busy = [p for p in (8089, 8443) if not _free(p)]
    assert not busy, f"the page's ports {busy} are in use on this machine: free them to run this test"
    client = MlflowClient(fleet_mlflow)
    work = tmp_path / "reader"
    work.mkdir()
    (work / "recipe.yaml").write_text(yaml.safe_dump({
        "source": f"models:/{MODEL}@champion", "data": {"provider": "sklearn-digits", "args": {"seed": 0}},
        "stages": [{"quantize": {"method": "ptq", "calibrator": "percentile", "num_samples": 256}}],
        "register": {"alias": "edge-candidate", "experiment": "docs-trigger"}}))
    _new_version(tmp_path, 60)  # the reader's model has a version already
    sh = DocShell(work, dict(os.environ, MLFLOW_TRACKING_URI=fleet_mlflow))
    try:
        # --- over http, with the development settings on the MLflow server
        start = time.monotonic()
        sh.run("docs/registry-trigger.md", "trigger-start")
        log = work / "trigger.log"
        wait_for(lambda: "listening on http://127.0.0.1:8089/" in _text(log), 120, "the trigger to listen")
        head = _text(log)
        assert ("MLflow's server refuses webhooks to http://127.0.0.1:8089/ by default (http:// is refused; "
                "127.0.0.1 is not a public address): start `mlflow server` with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,"
                "https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true") in head, head
        time.sleep(1.5)  # the server's webhook cache, MLFLOW_WEBHOOK_CACHE_TTL=1 as the page sets it
        version = _new_version(tmp_path, 61)
        out = sh.run("docs/registry-trigger.md", "champion")
        assert f"champion -> {version}" in out.stdout
        wait_for(lambda: f"{MODEL} v{version} (new version): compression queued" in _text(log), 120,
                 "the new version's delivery")
        wait_for(lambda: f"{MODEL} v{version} (alias champion)" in _text(log), 120, "the champion delivery")
        wait_for(lambda: set(_ledger(client, version).values()) & set(STATES), 300, "the ledger tag")
        assert "edgeslim.trigger." in sh.run("docs/registry-trigger.md", "ledger").stdout
        assert "deleted webhook" in sh.run("docs/registry-trigger.md", "trigger-remove").stdout
        assert not [h for h in client.list_webhooks() if h.name == "edgeslim-trigger"]
        http_s = time.monotonic() - start

        # --- over TLS: a self-signed certificate the MLflow server's Python trusts
        start = time.monotonic()
        sh.run("docs/registry-trigger.md", "tls-cert")
        # "where mlflow server runs, with its Python": the test server's certifi is a copy on its PYTHONPATH.
        sh.run("docs/registry-trigger.md", "tls-trust", env={"PYTHONPATH": str(mlflow_server_certifi)})
        assert (work / "trigger.crt").read_text() in (mlflow_server_certifi / "certifi" / "cacert.pem").read_text()
        sh.run("docs/registry-trigger.md", "tls-start")
        tls_log = work / "trigger-tls.log"
        wait_for(lambda: "listening on https://127.0.0.1:8443/" in _text(tls_log), 120, "the TLS trigger to listen")
        head = _text(tls_log)
        assert "127.0.0.1 is not a public address): start `mlflow server` with MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true" \
            in head and "ALLOWED_SCHEMES" not in head, head
        time.sleep(1.5)
        version = _new_version(tmp_path, 62)
        sh.run("docs/registry-trigger.md", "champion")
        wait_for(lambda: f"{MODEL} v{version} (new version): compression queued" in _text(tls_log), 120,
                 "the delivery over TLS")
        wait_for(lambda: set(_ledger(client, version).values()) & set(STATES), 300, "the ledger tag")
        assert "TLS handshake failed" not in _text(tls_log)
        tls_s = time.monotonic() - start
    finally:
        sh.close()
        for hook in client.list_webhooks():
            if hook.name in ("edgeslim-trigger", "edgeslim-trigger-tls"):
                client.delete_webhook(hook.webhook_id)
    record_property("registry_trigger_http_s", round(http_s, 1))
    record_property("registry_trigger_tls_s", round(tls_s, 1))
    print(f"\nregistry trigger, as documented: http {http_s:.0f} s, TLS {tls_s:.0f} s")
