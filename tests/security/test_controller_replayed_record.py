"""A bucket writer puts back an older, validly signed version of an aborted rollout's record and
deletes the abort request: `reconcile` must not resume it (MLflow's end-of-rollout tag says it ended)."""

from __future__ import annotations

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_a_replayed_pending_record_of_an_aborted_rollout_is_not_resumed(s3_store, keys, agents, register_edge_model,
                                                                         tmp_path, caplog):
    dev = agents("p0", ORIN)
    _, sha1 = register_edge_model("fleet-replay", make_onnx(tmp_path / "v1.onnx", seed=21))
    c = keys.controller(s3_store)
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "60"})
    assert c.create("r1", "models:/fleet-replay@edge-candidate", cfg)["state"] == "succeeded"
    _, sha2 = register_edge_model("fleet-replay", make_onnx(tmp_path / "v2.onnx", seed=22))
    key = FleetKeys("lab").rollout("r2")
    pending = c.create("r2", "models:/fleet-replay@edge-candidate", cfg, wait=False)  # recorded, not run
    assert pending["state"] == "pending"
    snapshot = s3_store.get(key).data  # the attacker keeps this validly signed version
    assert c.abort("r2", "operator said no")["state"] == "aborted"
    s3_store.put(key, snapshot)  # ...and puts it back, deleting the abort request
    s3_store.delete(FleetKeys("lab").abort_request("r2"))

    caplog.set_level("ERROR", logger="edgeslim.controller")
    assert c.reconcile() == []
    assert "a replay" in caplog.text and "r2" in caplog.text
    assert c.untrusted == [key]
    wait_for(lambda: dev.running_sha() == sha1, 30, "the device to keep v1")
    manifest = s3_store.get_json(FleetKeys("lab").manifest("p0"))[0]["signed"]
    assert manifest["rollout_id"] == "r1" and manifest["artifact"]["sha256"] == sha1 != sha2


def test_a_record_one_write_behind_the_state_is_read_again_until_it_catches_up(s3_store, keys, register_edge_model,
                                                                                tmp_path):
    """A controller enters an ending rollout in its signed state, then writes the record: a reader (`mlflow
    deployments get`) between the two writes finds the record behind the state. It reads again and gets the
    ended record once it is written, where a record put back for good is refused (the test above)."""
    import threading

    register_edge_model("fleet-settle", make_onnx(tmp_path / "v1.onnx", seed=23))
    c = keys.controller(s3_store)
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "60"})
    key = FleetKeys("lab").rollout("r3")
    assert c.create("r3", "models:/fleet-settle@edge-candidate", cfg, wait=False)["state"] == "pending"
    before = s3_store.get(key).data
    assert c.abort("r3", "operator said no")["state"] == "aborted"
    ended = s3_store.get(key).data
    s3_store.put(key, before)  # the store as a reader sees it between the controller's two writes
    late = threading.Timer(1.0, s3_store.put, (key, ended))
    late.start()
    try:
        got = keys.controller(s3_store).get("r3")
    finally:
        late.join()
    assert got["state"] == "aborted" and got["name"] == "r3"
