"""Finding 3a: an abort that arrives after the last wave reported is not lost.

The controller runs a two-wave rollout of v2. Its ``sleep`` hook (the only moment the running
controller yields) waits, during the last wave, until every device has committed v2, and only
then has a *second* controller ask for the abort (``Controller.abort`` while the first holds
the lock: it records the request and leaves the rollback to the lock holder). The rollout must
end ``aborted``, ``edge-stable`` must stay on v1 in MLflow, and every device must be back on v1.
Real RGW store, real ``mlflow server``, real agent processes.
"""

from __future__ import annotations

import json
import time

import pytest

from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")
REASON = "operator: stop, after the last report"


def test_abort_after_the_last_wave_reported_rolls_back_and_keeps_edge_stable(
        s3_store, keys, agents, register_edge_model, tmp_path):
    from mlflow import MlflowClient

    devs = {n: agents(n, ORIN) for n in ("l0", "l1")}
    cfg = WaveRolloutConfig.from_strings({"waves": "50,100", "poll_interval_s": "0.2", "wave_timeout_s": "120"})
    v1, sha1 = register_edge_model("sec-late-abort", make_onnx(tmp_path / "v1.onnx", seed=41))
    assert keys.controller(s3_store).create("r1", f"models:/sec-late-abort/{v1}", cfg)["state"] == "succeeded"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 60, "both devices on v1")
    client = MlflowClient()
    assert str(client.get_registered_model("sec-late-abort").aliases["edge-stable"]) == v1
    v2, sha2 = register_edge_model("sec-late-abort", make_onnx(tmp_path / "v2.onnx", seed=42))

    def signed(key):
        got = s3_store.get_json(key)
        return got[0]["signed"] if got else {}

    def committed_r2(dev):
        last = signed(K.status(dev)).get("last") or {}
        return last.get("rollout_id") == "r2" and last.get("result") == "committed"

    second = keys.controller(s3_store)
    asked = {}

    def sleep(seconds):
        # In the last wave (every device has an r2 manifest), hold the running controller here until
        # every device has committed v2, then ask for the abort from another controller.
        if not asked and all(signed(K.manifest(d)).get("rollout_id") == "r2" for d in devs):
            wait_for(lambda: all(committed_r2(d) for d in devs), 120, "every device to commit v2")
            asked["rec"] = second.abort("r2", REASON)
        time.sleep(seconds)

    first = keys.controller(s3_store, sleep=sleep)
    rec = first.create("r2", f"models:/sec-late-abort/{v2}", cfg)
    assert asked, "the abort was never asked: the hook did not run in the last wave"
    assert asked["rec"]["abort_requested"] == REASON  # the lock holder was left to roll back

    assert rec["state"] == "aborted" and rec["reason"] == REASON
    assert [w["state"] for w in rec["waves"]] == ["done", "done"]
    assert {d["outcome"] for d in rec["devices"].values()} == {"committed"}  # the last wave had reported
    stored = signed(K.rollout("r2"))
    assert stored["state"] == "aborted" and stored["reason"] == REASON
    for dev, d in rec["devices"].items():
        assert d["rolled_back"]["action"] == "rollback", d
        m = signed(K.manifest(dev))
        assert m["action"] == "rollback" and m["artifact"]["sha256"] == sha1 and m["rollout_id"] == "r2"
    assert str(client.get_registered_model("sec-late-abort").aliases["edge-stable"]) == v1
    tag = json.loads(client.get_model_version("sec-late-abort", v2).tags["edgeslim.fleet.lab"])
    assert tag["state"] == "aborted"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 60, "both devices back on v1")
    assert s3_store.get(K.lock) is None
