"""``edgeslim trigger`` in process: routing, filtering, the ledger, the queue and the health routes.

The receiver is the real hardened server on loopback; MLflow is a fake client with model-version
tags, and the runner is a recording function (the real local runner is covered by
tests/integration/test_trigger_from_registry.py). The KFP runner is real, aimed at a closed port.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import types
import uuid
from pathlib import Path

import pytest
import yaml

from edgeslim.components.common.errors import ConfigError, SourceError
from edgeslim.deploy.trigger import (DONE, FAILED, REJECTED, SUBMITTED, Outcome, TagLedger, Trigger, ledger_key,
                                     make_trigger_server)
from tests.fleet_it_helpers import http_request, mlflow_signed_headers

REPO = Path(__file__).resolve().parents[2]
SECRET = "trigger-secret-for-tests"
H = "0123456789abcdef"
KEY = ledger_key(H)


# ------------------------------------------------------------------ helpers
class FakeRegistry:
    """What the ledger asks of an ``MlflowClient``: model versions and their tags."""

    def __init__(self, versions: dict[tuple[str, str], str] | None = None) -> None:
        self.status = dict(versions or {})  # (name, version) -> status
        self.tags: dict[tuple[str, str], dict[str, str]] = {k: {} for k in self.status}
        self.calls: list[tuple] = []
        self.down = False

    def get_model_version(self, name, version):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        self.calls.append(("get", name, version))
        if self.down:
            raise ConnectionError("connection refused")
        if (name, version) not in self.status:
            raise MlflowException(f"Model Version (name={name}, version={version}) not found",
                                  error_code=RESOURCE_DOES_NOT_EXIST)
        st = self.status[(name, version)]
        if st == "PENDING_REGISTRATION":  # ready on the next look
            self.status[(name, version)] = "READY"
        return types.SimpleNamespace(status=st, status_message="", tags=dict(self.tags[(name, version)]))

    def set_model_version_tag(self, name, version, key, value):
        self.calls.append(("tag", name, version, key, value))
        self.tags[(name, version)][key] = value


def event(name="m", version="3", kind="version", alias="champion") -> bytes:
    """What MLflow sends (mlflow/webhooks/delivery.py): ``model_version.created`` or ``..._alias.created``."""
    if kind == "version":
        e = {"entity": "model_version", "action": "created",
             "data": {"name": name, "version": version, "source": "models:/m-abc", "run_id": "r", "tags": {},
                      "description": None}}
    elif kind == "alias":
        e = {"entity": "model_version_alias", "action": "created",
             "data": {"name": name, "alias": alias, "version": version}}
    else:
        e = {"entity": "model_version_tag", "action": "set",
             "data": {"name": name, "version": version, "key": "k", "value": "v"}}
    e["timestamp"] = "2026-01-01T00:00:00+00:00"
    return json.dumps(e).encode()


def signed(body: bytes, delivery: str | None = None, secret: str = SECRET) -> dict:
    return mlflow_signed_headers(secret, body, delivery)


def request(port: int, method: str, path: str = "/", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, str]:
    return http_request(port, method, path, body, headers)


def deliver(port: int, body: bytes, delivery: str | None = None) -> tuple[int, str]:
    return request(port, "POST", "/", body, signed(body, delivery))


class Recorder:
    """The runner, replaced: records each (name, version); ``gate`` holds it until set."""

    def __init__(self, outcome: Outcome | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.outcome = outcome or Outcome(DONE, "registered m-edge v1 as @edge-candidate")
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail: Exception | None = None

    def __call__(self, name: str, version: str) -> Outcome:
        self.calls.append((name, version))
        self.started.set()
        assert self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        return self.outcome


@pytest.fixture
def rig():
    """A started receiver watching ``m`` and ``m2``; yields a namespace (port, trigger, registry, runner)."""
    made = []

    def make(*, versions=None, queue_size=4, ready=None, outcome=None):
        registry = FakeRegistry({("m", "3"): "READY", ("m", "4"): "READY", ("m", "5"): "READY",
                                 ("m2", "1"): "READY", ("other", "1"): "READY"} if versions is None else versions)
        runner = Recorder() if outcome is None else Recorder(outcome)
        trigger = Trigger(models=["m", "m2"], alias="champion", recipe_hash=H, ledger=TagLedger(registry, poll_s=0.01),
                          run=runner, queue_size=queue_size, ready=ready, ready_cache_s=0.0)
        server = make_trigger_server("127.0.0.1", 0, SECRET, trigger, read_timeout=2.0, workers=2)
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        ns = types.SimpleNamespace(port=server.server_port, trigger=trigger, registry=registry, runner=runner,
                                   server=server)
        made.append((server, t, trigger))
        return ns

    yield make
    for server, t, trigger in made:
        trigger.stop(1)
        server.shutdown()
        server.server_close()
        t.join(10)


# ------------------------------------------------------------------ routing and filtering
def test_a_new_version_of_a_watched_model_is_compressed_and_recorded_on_its_tags(rig, caplog):
    caplog.set_level(logging.INFO, logger="edgeslim.trigger")
    r = rig()
    status, text = deliver(r.port, event("m", "3"))
    assert status == 202 and "queued" in text
    assert r.trigger.wait_idle()
    assert r.runner.calls == [("m", "3")]
    tags = r.registry.tags[("m", "3")]
    assert tags[KEY] == DONE and tags[KEY + ".detail"] == "registered m-edge v1 as @edge-candidate"
    # "submitted" was written before the run, the outcome after it.
    states = [c[4] for c in r.registry.calls if c[0] == "tag" and c[3] == KEY]
    assert states == [SUBMITTED, DONE]
    assert "m v3: done: registered m-edge v1" in caplog.text


def test_the_champion_alias_moving_triggers_and_other_events_do_not(rig):
    r = rig()
    assert deliver(r.port, event("m", "4", kind="alias"))[0] == 202
    assert deliver(r.port, event("m", "5", kind="alias", alias="staging"))[0] == 204
    assert deliver(r.port, event("m", "5", kind="tag"))[0] == 204
    deleted = json.dumps({"entity": "model_version", "action": "deleted", "data": {"name": "m", "version": "5"}})
    assert deliver(r.port, deleted.encode())[0] == 204
    assert r.trigger.wait_idle()
    assert r.runner.calls == [("m", "4")]


def test_an_unwatched_model_is_ignored_and_logged_and_nothing_is_recorded(rig, caplog):
    caplog.set_level(logging.INFO, logger="edgeslim.trigger")
    r = rig()
    assert deliver(r.port, event("other", "1"))[0] == 204
    assert deliver(r.port, event("other", "1", kind="alias"))[0] == 204
    assert r.trigger.wait_idle()
    assert r.runner.calls == [] and r.registry.calls == []
    assert "ignored: model other is not watched by this trigger" in caplog.text


def test_malformed_and_unauthenticated_events_are_refused(rig):
    r = rig()
    body = event("m", "3")
    assert request(r.port, "POST", "/", body, signed(body, secret="wrong"))[0] == 401
    for bad in ({"name": "m"}, {"name": "m", "version": True}, {"name": "m", "version": "3; rm"},
                {"name": 5, "version": "3"}):
        b = json.dumps({"entity": "model_version", "action": "created", "data": bad}).encode()
        assert deliver(r.port, b)[0] == 400, bad
    assert deliver(r.port, b"[1]")[0] == 400
    assert r.trigger.wait_idle() and r.runner.calls == []


# ------------------------------------------------------------------ idempotency
def test_a_version_is_compressed_once_per_recipe_whatever_events_arrive(rig, caplog):
    caplog.set_level(logging.INFO, logger="edgeslim.trigger")
    r = rig()
    r.runner.gate.clear()
    # A new version and then champion on it: two deliveries while the first is compressing.
    assert deliver(r.port, event("m", "3"))[0] == 202
    assert r.runner.started.wait(10)
    assert deliver(r.port, event("m", "3", kind="alias"))[0] == 200  # already compressing: not queued again
    r.runner.gate.set()
    assert r.trigger.wait_idle()
    # Champion set again later, and the same delivery replayed: nothing more runs.
    assert deliver(r.port, event("m", "3", kind="alias"))[0] == 202
    assert r.trigger.wait_idle()  # its job found the version done (a delivery meanwhile would find it queued)
    headers = signed(event("m", "3", kind="alias"))
    assert request(r.port, "POST", "/", event("m", "3", kind="alias"), headers)[0] == 202
    assert r.trigger.wait_idle()
    replay = request(r.port, "POST", "/", event("m", "3", kind="alias"), headers)
    assert replay[0] == 200 and "duplicate" in replay[1]
    assert r.trigger.wait_idle()
    assert r.runner.calls == [("m", "3")]
    assert "m v3: already done with recipe 0123456789abcdef" in caplog.text
    # Another recipe (another hash) is another ledger entry: it compresses the version again.
    other = Trigger(models=["m"], alias="champion", recipe_hash="fedcba9876543210", ledger=r.trigger.ledger,
                    run=r.runner)
    assert other.process("m", "3").state == DONE
    assert r.runner.calls == [("m", "3"), ("m", "3")]
    assert r.registry.tags[("m", "3")][ledger_key("fedcba9876543210")] == DONE


def test_a_settled_ledger_entry_from_before_a_restart_is_respected(rig):
    r = rig()
    for state in (SUBMITTED, REJECTED):
        r.registry.tags[("m", "3")] = {KEY: state, KEY + ".detail": "earlier"}
        assert deliver(r.port, event("m", "3", kind="alias"))[0] == 202
        assert r.trigger.wait_idle()
    assert r.runner.calls == []


def test_a_failed_compression_says_why_and_runs_again_on_the_next_event(rig, caplog):
    from edgeslim.pipelines.local import PipelineTaskFailed

    caplog.set_level(logging.INFO, logger="edgeslim.trigger")
    r = rig()
    r.runner.fail = PipelineTaskFailed("task 'quantize' failed: out of memory\nsecond line")
    assert deliver(r.port, event("m", "3"))[0] == 202
    assert r.trigger.wait_idle()
    tags = r.registry.tags[("m", "3")]
    assert tags[KEY] == FAILED and tags[KEY + ".detail"] == "task 'quantize' failed: out of memory second line"
    assert [ln for ln in caplog.text.splitlines() if "m v3: failed:" in ln]
    r.runner.fail = None
    assert deliver(r.port, event("m", "3", kind="alias"))[0] == 202
    assert r.trigger.wait_idle()
    assert r.runner.calls == [("m", "3"), ("m", "3")] and r.registry.tags[("m", "3")][KEY] == DONE
    assert "it failed before: task 'quantize' failed" in caplog.text


def test_an_event_for_a_version_that_does_not_exist_submits_nothing(rig, caplog):
    caplog.set_level(logging.INFO, logger="edgeslim.trigger")
    r = rig()
    assert deliver(r.port, event("m", "99", kind="alias"))[0] == 202
    assert r.trigger.wait_idle()
    assert r.runner.calls == [] and not any(c[0] == "tag" for c in r.registry.calls)
    assert "m v99: registered model 'm' has no version 99; nothing submitted" in caplog.text
    # MLflow down when the worker looks: logged, nothing submitted, nothing recorded.
    r.registry.down = True
    assert deliver(r.port, event("m", "4"))[0] == 202
    assert r.trigger.wait_idle()
    assert r.runner.calls == [] and "m v4: MLflow did not answer" in caplog.text


def test_the_ledger_waits_for_a_version_still_being_registered():
    reg = FakeRegistry({("m", "1"): "PENDING_REGISTRATION", ("m", "2"): "FAILED_REGISTRATION"})
    ledger = TagLedger(reg, poll_s=0.01)
    assert ledger.tags("m", "1") == {}
    with pytest.raises(SourceError, match="FAILED_REGISTRATION"):
        ledger.tags("m", "2")
    ledger.mark("m", "1", H, FAILED, "x" * 5000)
    assert reg.tags[("m", "1")][KEY] == FAILED and len(reg.tags[("m", "1")][KEY + ".detail"]) == 1000


# ------------------------------------------------------------------ the bounded queue
def test_a_full_queue_answers_503_and_mlflows_retry_of_that_delivery_gets_in(rig):
    r = rig(queue_size=1)
    r.runner.gate.clear()
    assert deliver(r.port, event("m", "3"))[0] == 202
    assert r.runner.started.wait(10)  # compressing: out of the queue
    assert deliver(r.port, event("m", "4"))[0] == 202  # waits: the queue is full now
    body, delivery = event("m", "5"), str(uuid.uuid4())
    status, text = deliver(r.port, body, delivery)
    assert status == 503 and "queue full" in text
    r.runner.gate.set()
    assert r.trigger.wait_idle()
    # MLflow retries a 503 with the same delivery id: the replay cache let go of it.
    assert deliver(r.port, body, delivery)[0] == 202
    assert r.trigger.wait_idle()
    assert r.runner.calls == [("m", "3"), ("m", "4"), ("m", "5")]


def test_one_compression_at_a_time():
    running, most = [0], [0]
    lock = threading.Lock()

    def run(name, version):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return Outcome(DONE, "ok")

    reg = FakeRegistry({("m", str(v)): "READY" for v in range(1, 6)})
    t = Trigger(models=["m"], alias="champion", recipe_hash=H, ledger=TagLedger(reg), run=run, queue_size=8).start()
    try:
        for v in range(1, 6):
            assert t.on_event("d", json.loads(event("m", str(v))))[0] == 202
        assert t.wait_idle()
    finally:
        t.stop()
    assert most[0] == 1 and all(reg.tags[("m", str(v))][KEY] == DONE for v in range(1, 6))


def test_stopping_during_a_compression_marks_it_failed_so_it_runs_again():
    reg = FakeRegistry({("m", "1"): "READY"})
    runner = Recorder()
    runner.gate.clear()
    t = Trigger(models=["m"], alias="champion", recipe_hash=H, ledger=TagLedger(reg), run=runner).start()
    t.on_event("d", json.loads(event("m", "1")))
    assert runner.started.wait(10)
    t.stop(timeout=0.2)
    assert reg.tags[("m", "1")][KEY] == FAILED and "receiver stopped" in reg.tags[("m", "1")][KEY + ".detail"]
    runner.gate.set()


# ------------------------------------------------------------------ health routes
def test_health_and_readiness_routes(rig):
    state = {"ok": True}
    r = rig(ready=lambda: (state["ok"], "MLflow at http://x answers" if state["ok"] else "MLflow at http://x is "
                                                                                           "not reachable"))
    status, text = request(r.port, "GET", "/healthz")
    assert status == 200 and text.startswith("ok: idle")
    assert request(r.port, "GET", "/readyz") == (200, "MLflow at http://x answers\n")
    state["ok"] = False
    status, text = request(r.port, "GET", "/readyz?verbose=1")
    assert status == 503 and "not reachable" in text
    assert request(r.port, "GET", "/nope")[0] == 404
    assert request(r.port, "PUT", "/healthz", b"")[0] == 405
    assert request(r.port, "GET", "/healthz", b"x", {"Content-Length": "1"})[0] == 400
    # The worker gone: not alive.
    r.trigger.stop(1)
    assert request(r.port, "GET", "/healthz")[0] == 503
    # Signed events still need the POST route.
    assert deliver(r.port, event("m", "3"))[0] in (202, 503)


def test_readiness_against_a_real_address():
    from edgeslim.deploy.trigger import mlflow_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ok, text = mlflow_ready(f"http://127.0.0.1:{port}", timeout=2)
    assert not ok and f"MLflow at http://127.0.0.1:{port} is not reachable" in text


def test_the_trigger_needs_models_an_alias_and_a_hash():
    for kw in ({"models": []}, {"alias": ""}, {"recipe_hash": "not-hex"}, {"queue_size": 0}):
        args = {"models": ["m"], "alias": "champion", "recipe_hash": H, "ledger": None, "run": None, **kw}
        with pytest.raises(ConfigError):
            Trigger(**args)


# ------------------------------------------------------------------ the recipe hash and the KFP runner
def test_the_ledger_hash_leaves_the_source_out_and_follows_the_rest():
    from edgeslim.components.recipe import load_recipe
    from edgeslim.pipelines.trigger import for_version, trigger_hash

    recipe = load_recipe(REPO / "pipelines" / "demo_recipe.yaml")
    h = trigger_hash(recipe)
    assert h == trigger_hash(for_version(recipe, "x", "7")) == trigger_hash(recipe.with_overrides(tracking_uri="u"))
    assert h != trigger_hash(recipe.with_overrides(gate=recipe.gate.__class__(**{**recipe.gate.to_dict(),
                                                                                "min_sqnr_db": 1.0})))
    assert for_version(recipe, "x", "7").source == "models:/x/7"


def test_an_unreachable_kfp_host_is_one_log_line_and_a_failed_ledger_entry(caplog):
    from edgeslim.components.recipe import load_recipe
    from edgeslim.pipelines.trigger import kfp_runner, trigger_hash

    caplog.set_level(logging.INFO, logger="edgeslim.trigger")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = load_recipe(REPO / "pipelines" / "demo_recipe.yaml")
    run = kfp_runner(recipe, host=f"http://127.0.0.1:{port}", tracking_uri="http://mlflow:5000")
    reg = FakeRegistry({("m", "1"): "READY"})
    h = trigger_hash(recipe)
    t = Trigger(models=["m"], alias="champion", recipe_hash=h, ledger=TagLedger(reg), run=run, runner="kfp")
    out = t.process("m", "1")
    assert out.state == FAILED and "cannot reach Kubeflow Pipelines" in out.detail
    assert reg.tags[("m", "1")][ledger_key(h)] == FAILED
    assert reg.tags[("m", "1")][ledger_key(h) + ".detail"].startswith(f"cannot reach Kubeflow Pipelines at "
                                                                        f"http://127.0.0.1:{port}")
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "m v1: failed: cannot reach Kubeflow Pipelines" in lines[0].getMessage()
    assert "Traceback" not in caplog.text


# ------------------------------------------------------------------ the command and its manifest
def test_the_command_refuses_to_start_without_what_it_needs(tmp_path, monkeypatch, capsys):
    from edgeslim.cli import main

    recipe = REPO / "pipelines" / "demo_recipe.yaml"
    monkeypatch.delenv("EDGESLIM_WEBHOOK_SECRET", raising=False)
    base = ["trigger", "--model", "m", "--recipe", str(recipe), "--tracking-uri", "http://127.0.0.1:9",
            "--port", "0", "--workdir", str(tmp_path)]
    assert main(base) == 2
    assert "set EDGESLIM_WEBHOOK_SECRET" in capsys.readouterr().err
    monkeypatch.setenv("EDGESLIM_WEBHOOK_SECRET", "s")
    assert main([*base, "--runner", "kfp"]) == 2
    assert "--runner kfp needs --host" in capsys.readouterr().err


def test_the_kubernetes_manifest_runs_a_real_trigger_command_with_probes_on_its_routes():
    from edgeslim.cli import build_parser

    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "trigger-receiver.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = build_parser().parse_args(c["command"][1:])
    assert args.command == "trigger" and args.runner == "kfp" and args.host and args.listen == "0.0.0.0"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {c["livenessProbe"]["httpGet"]["port"], c["ports"][0]["containerPort"]} == {args.port}
    env = {e["name"]: e for e in c.get("env", [])}
    assert "valueFrom" in env["EDGESLIM_WEBHOOK_SECRET"] and "EDGESLIM_FLEET_SIGNING_KEY" not in env
    assert deployment["spec"]["replicas"] == 1
    # TLS from a mounted kubernetes.io/tls secret (not a subPath: renewals must show), probed over HTTPS,
    # and --url is the Service's https URL, the one MLflow's create_webhook gets.
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "subPath" not in mounts["tls"] and volumes["tls"]["secret"]["secretName"] == "edgeslim-trigger-tls"
    assert {args.tls_cert, args.tls_key} == {mounts["tls"]["mountPath"] + "/tls.crt",
                                             mounts["tls"]["mountPath"] + "/tls.key"}
    assert c["livenessProbe"]["httpGet"]["scheme"] == c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert args.url == f"https://{service['metadata']['name']}.mlops.svc:{service['spec']['ports'][0]['port']}/"
