"""Rollout requests (deploy/requests.py) and the keyless webhook receiver (deploy/webhook.py), in process.

The receiver runs on loopback with real sockets; the store is a LocalStore. The tests with real
processes, RGW and MLflow are in tests/security/test_webhook_*.py and
tests/integration/fleet/test_fleet_webhook.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from edgeslim.components.common.errors import ConfigError, FleetError, SourceError
from edgeslim.deploy import bounded, requests as fleet_requests
from edgeslim.deploy.requests import pending_requests, process_requests, record_request, request_key
from edgeslim.deploy.webhook import ReplayCache, make_server
from tests.fleet_it_helpers import http_request, mlflow_signed_headers

SECRET = "s3cret-for-tests"


def _event(name="m", version="3", alias="edge-candidate", entity="model_version_alias", action="created"):
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": name, "alias": alias, "version": version}}).encode()


def _signed(body: bytes, delivery: str | None = None, secret: str = SECRET, ts: int | None = None) -> dict:
    return mlflow_signed_headers(secret, body, delivery, ts)


def _post(port: int, body: bytes, headers: dict) -> tuple[int, str]:
    return http_request(port, "POST", "/", body, headers)


def _raw(port: int, data: bytes, *, read: bool = True) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        if not read:
            return ""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out.decode("latin-1")


@pytest.fixture
def receiver(store):
    """A receiver following model ``m`` that records into ``store`` (fleet ``f``); yields (server, calls)."""
    calls: list[tuple] = []
    fail = {"n": 0}

    def on_request(model, version, alias, delivery_id):
        calls.append((model, version, alias, delivery_id))
        if fail["n"]:
            fail["n"] -= 1
            raise FleetError("store down")
        return record_request(store, "f", model=model, version=version, alias=alias, delivery_id=delivery_id)

    server = make_server("127.0.0.1", 0, SECRET, "edge-candidate", models=["m", "m2"], on_request=on_request,
                         read_timeout=1.0, workers=2)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    server.calls, server.fail = calls, fail
    yield server
    server.shutdown()
    server.server_close()
    t.join(10)


# ------------------------------------------------------------------ requests in the store
def test_a_request_is_written_once_per_delivery_and_read_back(store):
    assert record_request(store, "f", model="m", version="3", alias="edge-candidate", delivery_id="d-1",
                          received_at=10.0)
    assert not record_request(store, "f", model="m", version="4", alias="edge-candidate", delivery_id="d-1")
    assert record_request(store, "f", model="m", version="2", alias="edge-candidate", delivery_id="d-0",
                          received_at=5.0)
    got = pending_requests(store, "f")
    assert [(r["delivery_id"], r["version"]) for r in got] == [("d-0", "2"), ("d-1", "3")]
    assert got[1] == {"type": "edgeslim.fleet.request", "model": "m", "version": "3", "alias": "edge-candidate",
                      "delivery_id": "d-1", "received_at": 10.0}
    assert request_key("f", "d-1") == "fleets/f/requests/d-1.json"
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ConfigError):
            request_key("f", bad)


def test_junk_requests_are_deleted_unused(store, caplog):
    record_request(store, "f", model="m", version="1", alias="edge-candidate", delivery_id="good")
    base = "fleets/f/requests/"
    store.put(base + "huge.json", b" " * (bounded.MAX_SMALL_BYTES + 1))
    store.put(base + "deep.json", b"[" * 5000)
    store.put(base + "notjson.json", b"{nope")
    store.put(base + "other-type.json", json.dumps({"type": "x", "model": "m"}).encode())
    store.put(base + "mismatch.json", json.dumps({"type": "edgeslim.fleet.request", "model": "m", "version": "1",
                                                  "alias": "edge-candidate", "delivery_id": "good",
                                                  "received_at": 1.0}).encode())
    store.put(base + "nested/x.json", b"{}")
    store.put(base + "noext", b"{}")
    store.put(base + "newline.json", json.dumps({"type": "edgeslim.fleet.request", "model": "m\nINFO forged",
                                                 "version": "1", "alias": "a", "delivery_id": "newline",
                                                 "received_at": 1.0}).encode())
    got = pending_requests(store, "f")
    assert [r["delivery_id"] for r in got] == ["good"]
    assert store.list(base) == [base + "good.json"]
    assert caplog.text.count("junk request") == 8


class _FakeController:
    def __init__(self, store):
        self.store, self.fleet = store, "f"


def test_reconcile_acts_only_on_followed_models_and_deletes_every_request(store, monkeypatch):
    calls = []

    def follow(controller, model, alias, rollout, raw):
        calls.append((model, alias, rollout, dict(raw)))
        if model == "boom":
            raise SourceError("registered model 'boom' has no alias 'edge-candidate'")
        return {"name": f"{model}-v7", "state": "succeeded", "model": {"name": model, "version": "7"}}

    monkeypatch.setattr("edgeslim.deploy.controller.follow_alias", follow)
    for i, (model, alias) in enumerate([("m", "edge-candidate"), ("m", "edge-candidate"), ("evil", "edge-candidate"),
                                        ("m2", "staging"), ("boom", "edge-candidate")]):
        record_request(store, "f", model=model, version="3", alias=alias, delivery_id=f"d{i}", received_at=i)
    out = process_requests(_FakeController(store), models=["m", "m2", "boom"], alias="edge-candidate",
                           raw_config={"waves": "100"})
    # One look-up for m (two requests), none for the unfollowed model or the other alias.
    assert calls == [("m", "edge-candidate", None, {"waves": "100"}), ("boom", "edge-candidate", None, {"waves": "100"})]
    assert [(o["delivery_id"], o["outcome"]) for o in out] == [
        ("d0", "started"), ("d1", "started"), ("d2", "ignored"), ("d3", "ignored"), ("d4", "not-started")]
    assert out[0]["rollout"] == "m-v7" and out[0]["requested_version"] == "3" and out[0]["version"] == "7"
    assert store.list("fleets/f/requests/") == []


def test_a_bad_rollout_setting_uses_up_no_request(store, monkeypatch):
    monkeypatch.setattr("edgeslim.deploy.controller.follow_alias", lambda *a: pytest.fail("must not run"))
    record_request(store, "f", model="m", version="3", alias="edge-candidate", delivery_id="d0")
    with pytest.raises(ConfigError):
        process_requests(_FakeController(store), models=["m"], alias="edge-candidate", raw_config={"waves": "x"})
    assert len(pending_requests(store, "f")) == 1


def test_the_requests_module_needs_neither_mlflow_nor_the_controller_to_record():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(fleet_requests))
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | \
          {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and (m.startswith("mlflow") or m.endswith(".controller") or m.endswith("signing")) for m in top)


# ------------------------------------------------------------------ the receiver
def test_a_signed_event_for_a_followed_model_is_recorded(receiver, store):
    body = _event("m", "3")
    headers = _signed(body)
    assert _post(receiver.server_port, body, headers)[0] == 202
    (req,) = pending_requests(store, "f")
    assert (req["model"], req["version"], req["alias"], req["delivery_id"]) == \
        ("m", "3", "edge-candidate", headers["X-MLflow-Delivery-Id"])


def test_events_the_receiver_does_not_act_on(receiver, store, caplog):
    caplog.set_level("INFO", logger="edgeslim.webhook")
    port = receiver.server_port
    assert _post(port, _event("other"), _signed(_event("other")))[0] == 204
    assert "ignored: model other is not followed by this fleet" in caplog.text
    assert _post(port, _event("m", alias="staging"), _signed(_event("m", alias="staging")))[0] == 204
    deleted = _event("m", action="deleted")
    assert _post(port, deleted, _signed(deleted))[0] == 204
    assert receiver.calls == [] and pending_requests(store, "f") == []


def test_unauthenticated_and_malformed_requests_are_refused(receiver, store):
    port = receiver.server_port
    body = _event()
    assert _post(port, body, _signed(body, secret="wrong"))[0] == 401
    assert _post(port, body, _signed(body, ts=int(time.time()) - 3600))[0] == 401
    assert _post(port, body + b" ", _signed(body))[0] == 401
    assert _post(port, b"[" * 100, _signed(b"[" * 100))[0] == 400  # signed, but too deep: bounded.loads
    assert _post(port, b"{nope", _signed(b"{nope"))[0] == 400
    assert _post(port, body, _signed(body, delivery="../../x"))[0] == 400
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith("HTTP/1.1 405")
    assert _raw(port, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").startswith("HTTP/1.1 411")
    assert _raw(port, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").startswith("HTTP/1.1 411")
    assert _raw(port, b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").startswith("HTTP/1.1 400")
    assert _raw(port, b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").startswith("HTTP/1.1 400")
    assert _raw(port, b"garbage\r\n\r\n").startswith("HTTP/1.1 400")
    big = f"POST / HTTP/1.1\r\nContent-Length: {bounded.MAX_WEBHOOK_BYTES + 1}\r\n\r\n".encode()
    assert _raw(port, big + b"x" * 100_000).startswith("HTTP/1.1 413")
    assert _raw(port, b"POST / HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n").startswith("HTTP/1.1 431")
    # A request never finished is closed after read_timeout (1 s here), with 408.
    assert _raw(port, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").startswith("HTTP/1.1 408")
    assert receiver.calls == []
    # ...and the service still answers.
    assert _post(port, body, _signed(body))[0] == 202


def test_a_replayed_delivery_is_recorded_once(receiver, store):
    body = _event()
    headers = _signed(body)
    answers = [_post(receiver.server_port, body, headers) for _ in range(3)]
    assert [a[0] for a in answers] == [202, 200, 200] and "duplicate delivery ignored" in answers[1][1]
    assert len(pending_requests(store, "f")) == 1 and len(receiver.calls) == 1


def test_a_delivery_that_could_not_be_recorded_is_recorded_on_mlflows_retry(receiver, store):
    receiver.fail["n"] = 1
    body = _event()
    headers = _signed(body)
    assert _post(receiver.server_port, body, headers)[0] == 503
    assert pending_requests(store, "f") == []
    assert _post(receiver.server_port, body, headers)[0] == 202
    assert len(pending_requests(store, "f")) == 1


def test_replay_cache_keeps_entries_until_they_expire_and_never_evicts_early():
    now = [0.0]
    cache = ReplayCache(capacity=2, keep_s=600, clock=lambda: now[0])
    assert cache.reserve("a") == "new" and cache.reserve("a") == "pending"
    cache.finish("a")
    assert cache.reserve("a") == "done"
    assert cache.reserve("b") == "new"
    cache.release("b")  # not recorded: a retry may come
    assert cache.reserve("b") == "new" and cache.reserve("c") == "full"
    now[0] = 601.0
    assert cache.reserve("c") == "new" and cache.reserve("a") == "new" and len(cache) == 2


def test_the_receiver_needs_a_secret_and_models():
    with pytest.raises(ConfigError):
        make_server("127.0.0.1", 0, "", "edge-candidate", models=["m"], on_request=lambda *a: True)
    with pytest.raises(ConfigError):
        make_server("127.0.0.1", 0, SECRET, "edge-candidate", models=[], on_request=lambda *a: True)
