"""Registry-triggered compression end to end: a real ``mlflow server`` delivers its webhooks to
``edgeslim trigger`` (a real process, local runner); a new ``champion`` version of a watched
model ends as a new ``<name>-edge`` version with ``edge-candidate``, once.

One compression run in this file (~3-4 min on a busy 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.fleet_it_helpers import wait_for
from tests.fleet_it_helpers import http_request, mlflow_signed_headers

pytestmark = pytest.mark.slow

FAST = {"latency_warmup": 1, "latency_repeats": 3, "latency_batches": [1, 32]}


def _recipe(path: Path) -> Path:
    """The spine test's quick recipe (PTQ only); its source is replaced by each event's version."""
    path.write_text(yaml.safe_dump({
        "source": "models:/replaced-by-the-event/1",
        "data": {"provider": "sklearn-digits", "args": {"seed": 0}},
        "stages": [{"quantize": {"method": "ptq", "calibrator": "percentile", "num_samples": 256}}],
        "gate": {"max_metric_drop": 2.0, "min_top1_agreement": 0.95, "min_sqnr_db": 10.0},
        "evaluate": FAST,
        "register": {"alias": "edge-candidate", "experiment": "tests-trigger"},
    }))
    return path


class Receiver:
    """``edgeslim trigger`` as a real process; its stderr (the service log) collected."""

    def __init__(self, *args: str, secret: str) -> None:
        self.secret = secret
        env = dict(os.environ, EDGESLIM_WEBHOOK_SECRET=secret)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeslim", "trigger", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        first = self.proc.stdout.readline()
        threading.Thread(target=lambda: self.proc.stdout.read(), daemon=True).start()  # never a full pipe
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        if not m:
            self.stop()
            raise AssertionError(f"the receiver did not start: {first!r}\n{self.log()[-3000:]}")
        self.port = int(m.group(1))

    def log(self) -> str:
        return "".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        return http_request(self.port, method, path, body, headers, timeout=60)

    def deliver(self, event: dict, delivery: str) -> tuple[int, str]:
        """As MLflow delivers (v1 signature over ``<delivery id>.<timestamp>.<body>``)."""
        body = json.dumps(event).encode()
        return self.request("POST", "/", body, mlflow_signed_headers(self.secret, body, delivery))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def test_a_new_champion_version_is_compressed_once_to_an_edge_candidate(fleet_mlflow, tiny_teacher, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from edgeslim.components.recipe import load_recipe
    from edgeslim.deploy.trigger import ledger_key
    from edgeslim.pipelines.trigger import trigger_hash

    uri, client = fleet_mlflow, MlflowClient(fleet_mlflow)
    mlflow.set_tracking_uri(uri)  # the webhook-delivering server, whatever an earlier test pointed mlflow at
    name = f"trig-{uuid.uuid4().hex[:6]}"
    other = f"{name}-unwatched"
    recipe = _recipe(tmp_path / "recipe.yaml")
    key = ledger_key(trigger_hash(load_recipe(recipe)))
    rx = Receiver("--model", name, "--recipe", str(recipe), "--runner", "local", "--tracking-uri", uri,
                  "--workdir", str(tmp_path / "work"), secret=uuid.uuid4().hex)
    hook = client.create_webhook(name=f"edgeslim-trigger-{uuid.uuid4().hex[:6]}", url=f"http://127.0.0.1:{rx.port}/",
                                 events=["model_version.created", "model_version_alias.created"], secret=rx.secret)
    try:
        assert rx.request("GET", "/healthz")[0] == 200
        assert rx.request("GET", "/readyz") == (200, f"MLflow at {uri} answers\n")
        time.sleep(1.5)  # outlive the server's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1 in the fixture)

        # A new version of the watched model (model_version.created), then champion on it
        # (model_version_alias.created): two deliveries, one compression.
        mlflow.set_experiment("tests-trigger")
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(tiny_teacher, name="model", serialization_format="pickle",
                                            registered_model_name=name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, "champion", version)
        # A model nobody watches, its version and champion: delivered, verified, ignored.
        other_version = str(mlflow.register_model(info.model_uri, other).version)
        client.set_registered_model_alias(other, "champion", other_version)
        wait_for(lambda: rx.count(f"ignored: model {other} is not watched") >= 2, 120,
                 f"the receiver to ignore {other}'s two events")
        # The compression's progress is in the service's log, and so is what the receiver decides
        # while the local runner holds the process's logging (an event for a version that does not
        # exist: queued now, logged when the worker gets to it, nothing submitted).
        wait_for(lambda: rx.count(f"{name} v{version}: task "), 300, "the compression's first task")
        ghost = {"entity": "model_version_alias", "action": "created",
                 "data": {"name": name, "alias": "champion", "version": "99"}}
        assert rx.deliver(ghost, str(uuid.uuid4()))[0] == 202
        wait_for(lambda: rx.count(f"{name} v99 (alias champion): compression queued"), 30, "the queued line")

        def edge_candidate():
            try:
                return client.get_model_version_by_alias(f"{name}-edge", "edge-candidate")
            except MlflowException:
                assert rx.proc.poll() is None, f"the receiver died:\n{rx.log()[-4000:]}"
                return None

        mv = wait_for(edge_candidate, 900, f"{name}-edge@edge-candidate", interval=5)
        assert mv.tags["edgeslim.parent_name"] == name and mv.tags["edgeslim.parent_version"] == version
        parent = wait_for(lambda: (client.get_model_version(name, version).tags.get(key) == "done"
                                   and client.get_model_version(name, version)), 120, "the ledger to say done")
        assert f"registered {name}-edge v{mv.version} as @edge-candidate" in parent.tags[key + ".detail"]
        wait_for(lambda: rx.count(f"{name} v99: registered model '{name}' has no version 99; nothing submitted"),
                 60, "the missing version to be logged")
        assert list((tmp_path / "work").glob(f"{name}-v{version}-*/report.json"))
        lines = list(rx.lines)
        first = [i for i, ln in enumerate(lines) if f"{name} v99 (alias champion): compression queued" in ln]
        done = [i for i, ln in enumerate(lines) if f"{name} v{version}: done: " in ln]
        assert first and done and first[0] < done[0], "a decision made during the compression was not logged then"
        assert rx.count(f"{name} v{version}: compressing with recipe") == 1
        assert rx.count(f"{name} v{version}: task ") >= 4, rx.log()[-4000:]

        # Champion set again on the same version, and one delivery sent twice: nothing starts again.
        settled = rx.count(f"{name} v{version}: already done")
        client.set_registered_model_alias(name, "champion", version)
        wait_for(lambda: rx.count(f"{name} v{version}: already done") > settled, 120, "the repeat to be seen as done")
        again = {"entity": "model_version_alias", "action": "created",
                 "data": {"name": name, "alias": "champion", "version": version}}
        delivery = str(uuid.uuid4())
        assert rx.deliver(again, delivery)[0] == 202
        replay = rx.deliver(again, delivery)
        assert replay[0] == 200 and "duplicate" in replay[1]
        wait_for(lambda: rx.count(f"{name} v{version}: already done") > settled + 1, 120, "the delivery to be handled")
        assert rx.count(f"{name} v{version}: compressing with recipe") == 1, rx.log()[-4000:]
        assert [v.version for v in client.search_model_versions(f"name='{name}-edge'")] == [mv.version]

        # The unwatched model: no ledger entry, no edge model.
        assert not [k for k in client.get_model_version(other, other_version).tags if k.startswith("edgeslim.trigger")]
        assert not client.search_registered_models(filter_string=f"name='{other}-edge'")
        assert "Traceback" not in rx.log(), rx.log()[-4000:]
    finally:
        client.delete_webhook(hook.webhook_id)
        code = rx.stop()
    assert code == 0, rx.log()[-3000:]
