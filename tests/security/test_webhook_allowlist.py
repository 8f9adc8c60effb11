"""Finding 2: the webhook rolled out any model. Now it records requests only for the models it
follows (``--model``/``-C models=``) and ignores signed events for every other model.

Also the home of the helpers of tests/security/test_webhook_*.py: the receiver as a real
``edgeslim fleet webhook`` process (no signing key, and an ``mlflow`` that cannot be imported),
MLflow-style signed deliveries, and the receiver's RSS and thread count from /proc.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.fleet_it_helpers import wait_for
from tests.fleet_it_helpers import http_request, mlflow_signed_headers

pytestmark = pytest.mark.slow


def alias_event(name: str, version: str = "1", alias: str = "edge-candidate") -> bytes:
    """The body MLflow sends for ``model_version_alias.created`` (mlflow/webhooks/delivery.py)."""
    return json.dumps({"entity": "model_version_alias", "action": "created",
                       "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": name, "alias": alias, "version": version}}).encode()


def signed_headers(secret: str, body: bytes, delivery: str | None = None) -> dict[str, str]:
    """MLflow's v1 signature: HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>``."""
    return mlflow_signed_headers(secret, body, delivery)


class Receiver:
    """``edgeslim fleet webhook FLEET ...`` as a real process on loopback, its stderr collected."""

    def __init__(self, tmp_path: Path, s3_url: str, endpoint: str, *args: str, fleet: str = "lab") -> None:
        self.secret = uuid.uuid4().hex
        # The pod has no signing key and no MLflow: prove neither is needed.
        blocker = tmp_path / "no-mlflow" / "mlflow"
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "__init__.py").write_text("raise ImportError('no mlflow in the webhook pod')\n")
        env = {k: v for k, v in os.environ.items() if k not in ("EDGESLIM_FLEET_SIGNING_KEY", "MLFLOW_TRACKING_URI")}
        env.update(EDGESLIM_WEBHOOK_SECRET=self.secret,
                   PYTHONPATH=os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeslim", "fleet", "webhook", fleet, "--store", s3_url, "--endpoint-url",
             endpoint, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        first = self.proc.stdout.readline()
        m = re.search(r"https?://127\.0\.0\.1:(\d+)/", first)
        if not m:
            self.stop()
            raise AssertionError(f"the receiver did not start: {first!r}\n{''.join(self.lines)[-3000:]}")
        self.port = int(m.group(1))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def post(self, body: bytes, headers: dict[str, str], timeout: float = 60) -> tuple[int, str]:
        return http_request(self.port, "POST", "/", body, headers, timeout)

    def deliver(self, body: bytes, delivery: str | None = None) -> tuple[int, str]:
        return self.post(body, signed_headers(self.secret, body, delivery))

    def status(self, field: str) -> int:
        """``VmRSS`` (kB) or ``Threads`` of the receiver process."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def receiver_factory(tmp_path, rgw, s3_url):
    started: list[Receiver] = []

    def make(*args: str) -> Receiver:
        r = Receiver(tmp_path, s3_url, rgw["S3_ENDPOINT_URL"], *args)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def requests_in(store, fleet: str = "lab") -> list[dict]:
    from edgeslim.deploy.requests import pending_requests

    return pending_requests(store, fleet)


def test_signed_alias_events_of_models_the_fleet_does_not_follow_record_nothing(receiver_factory, s3_store):
    rx = receiver_factory("--model", "digits-edge", "-C", "models=detector-edge")
    # MLflow signs the alias events of every registered model with the one webhook secret.
    for name in ("someone-elses-model", "digits-edge-copy", "DIGITS-EDGE"):
        assert rx.deliver(alias_event(name, "9"))[0] == 204
        wait_for(lambda: rx.saw(f"ignored: model {name} is not followed by this fleet"), 30, "the ignore line")
    assert requests_in(s3_store) == []
    assert s3_store.list("fleets/lab/") == []
    # The followed models (from --model and from -C models=) are recorded, and only as a request.
    assert rx.deliver(alias_event("digits-edge", "4"))[0] == 202
    assert rx.deliver(alias_event("detector-edge", "2"))[0] == 202
    got = sorted((r["model"], r["version"], r["alias"]) for r in requests_in(s3_store))
    assert got == [("detector-edge", "2", "edge-candidate"), ("digits-edge", "4", "edge-candidate")]
    assert all("/requests/" in k for k in s3_store.list("fleets/lab/"))  # no rollout, no manifest
    assert rx.proc.poll() is None


def test_the_receiver_refuses_to_start_without_followed_models_or_with_a_signing_key(tmp_path, rgw, s3_url):
    env = dict(os.environ, EDGESLIM_WEBHOOK_SECRET="x")
    base = [sys.executable, "-m", "edgeslim", "fleet", "webhook", "lab", "--store", s3_url,
            "--endpoint-url", rgw["S3_ENDPOINT_URL"], "--port", "0"]
    out = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 2 and "--model NAME" in out.stderr
    out = subprocess.run(base + ["--model", "m", "--signing-key", str(tmp_path / "k.pem")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 2 and "signs nothing" in out.stderr
    out = subprocess.run(base + ["--model", "m", "-C", "waves=1,100"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 2 and "reconcile" in out.stderr
