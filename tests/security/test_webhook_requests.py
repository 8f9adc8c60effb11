"""The keyless receiver's requests are triggers, never instructions: anyone who can write the
bucket (or a hostile webhook pod) can plant one, and the controller Job re-checks the allow-list,
re-resolves the alias in a real MLflow, acts on nothing else, and deletes what it read.
Real RGW store, real ``mlflow server``."""

from __future__ import annotations

import json
import time

import pytest

from edgeslim.deploy import bounded
from edgeslim.deploy.controller import Controller
from edgeslim.deploy.requests import process_requests, request_key

pytestmark = pytest.mark.slow


def _plant(store, delivery: str, **fields) -> None:
    body = {"type": "edgeslim.fleet.request", "model": "m", "version": "1", "alias": "edge-candidate",
            "delivery_id": delivery, "received_at": time.time(), **fields}
    store.put(request_key("lab", delivery), json.dumps(body).encode())


def test_planted_or_forged_requests_start_nothing_and_are_deleted(fleet_mlflow, s3_store, caplog):
    from mlflow import MlflowClient

    # A followed model that exists in the registry but whose alias points nowhere.
    MlflowClient().create_registered_model("sec-followed")
    _plant(s3_store, "planted-1", model="attacker-model", version="1")          # not followed
    _plant(s3_store, "planted-2", model="sec-followed", version="999")           # forged version hint
    _plant(s3_store, "planted-3", model="sec-followed", alias="edge-stable")     # another alias
    s3_store.put(request_key("lab", "planted-4"), b"[" * 10_000)                 # nesting bomb
    s3_store.put(request_key("lab", "planted-5"), b" " * (bounded.MAX_SMALL_BYTES + 10))  # oversized
    s3_store.put("fleets/lab/requests/sub/x.json", b"{}")                      # a key that is no delivery id
    caplog.set_level("INFO")
    controller = Controller(s3_store, "lab")  # no key: nothing planted may get as far as signing
    out = process_requests(controller, models=["sec-followed"], alias="edge-candidate",
                           raw_config={"waves": "100"})
    by_id = {o["delivery_id"]: o for o in out}
    assert by_id["planted-1"]["outcome"] == "ignored" and by_id["planted-3"]["outcome"] == "ignored"
    # The forged version is only a hint: the alias is re-resolved in MLflow, which has none.
    assert by_id["planted-2"]["outcome"] == "not-started" and "edge-candidate" in by_id["planted-2"]["why"]
    assert set(by_id) == {"planted-1", "planted-2", "planted-3"}
    assert "model 'attacker-model' is not followed" in caplog.text
    assert caplog.text.count("junk request") == 3
    # Nothing was rolled out or written for a device, and every request is gone.
    keys = s3_store.list("fleets/lab/")
    assert not [k for k in keys if "/rollouts/" in k or "/devices/" in k or k.endswith("lock.json")], keys
    assert [k for k in keys if "/requests/" in k] == []
