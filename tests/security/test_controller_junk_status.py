"""Finding 3b: junk in one device's status does not crash the controller, nor the abort.

Five devices run v1; three of them are then stopped. Before the rollout of v2 starts, one of
them (``j0``) signs junk about itself with its own key (every field of the wrong type): the
controller reads it when it writes that device's manifest. Once every manifest is out, a bucket
writer puts a nesting bomb in ``j1``'s status and a huge object in ``j2``'s. The two honest
devices commit v2; a second controller asks for the abort. The controller must survive every
read of the junk, roll back *every* device it touched (the target is what each device said it
ran when the rollout reached it: v1, except for ``j0``, which said nothing usable), and save the
record; the honest devices, and ``j1``/``j2`` once their agents are back, run v1.
Real RGW store, real ``mlflow server``, real agent processes.
"""

from __future__ import annotations

import json
import time

import pytest

from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")
REASON = "operator: stop the rollout"


def test_junk_statuses_crash_neither_the_rollout_nor_the_abort(s3_store, keys, agents, register_edge_model, tmp_path):
    honest, junk = ("g0", "g1"), ("j0", "j1", "j2")
    devs = {n: agents(n, ORIN) for n in honest + junk}
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "180",
                                          "max_failure_pct": "100"})
    v1, sha1 = register_edge_model("sec-junk", make_onnx(tmp_path / "v1.onnx", seed=51))
    assert keys.controller(s3_store).create("r1", f"models:/sec-junk/{v1}", cfg)["state"] == "succeeded"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 90, "every device on v1")
    for n in junk:
        devs[n].stop()
    v2, sha2 = register_edge_model("sec-junk", make_onnx(tmp_path / "v2.onnx", seed=52))

    def signed(key):
        got = s3_store.get_json(key)
        return got[0]["signed"] if got else {}

    # j0 itself (its own key), lying in every field's type, before the rollout reaches it.
    key = signing.load_private_key(devs["j0"].state_dir / "device.key")
    lies = {"device_id": "j0", "current": "junk", "last": "committed", "rejected": ["x"], "metadata": 5,
            "applied_sequence": "99", "heartbeat_at": "now", "state": {"nested": [1, 2]}}
    s3_store.put_json(K.status("j0"), trust.sign_with(lies, [key]))

    def write_junk():
        # A bucket writer, once every manifest is out: a nesting bomb, and an object far over the status cap.
        s3_store.put(K.status("j1"), b"[" * 200_000)
        pad = "x" * (bounded.MAX_STATUS_BYTES * 4)
        s3_store.put(K.status("j2"), json.dumps({"signed": {"device_id": "j2", "pad": pad}, "signatures": []}).encode())

    second = keys.controller(s3_store)
    asked = {}

    def sleep(seconds):
        if not asked:  # every manifest is out (one wave): junk the statuses, wait for the honest, abort
            write_junk()
            wait_for(lambda: all((signed(K.status(d)).get("last") or {}).get("rollout_id") == "r2" for d in honest),
                     120, "the honest devices to answer r2")
            asked["rec"] = second.abort("r2", REASON)
        time.sleep(seconds)

    first = keys.controller(s3_store, sleep=sleep)
    rec = first.create("r2", f"models:/sec-junk/{v2}", cfg)
    assert asked and asked["rec"]["abort_requested"] == REASON
    assert rec["state"] == "aborted" and rec["reason"] == REASON
    assert set(rec["devices"]) == set(devs)
    for n in ("g0", "g1", "j1", "j2"):
        assert rec["devices"][n]["before"] == sha1
    for n in honest:
        assert rec["devices"][n]["outcome"] == "committed"
    assert rec["devices"]["j0"]["outcome"] == "failed"  # a device that signs junk about itself has failed
    # ...and said nothing usable about what it ran: "before" is what this fleet last directed it to run
    assert rec["devices"]["j0"]["before"] == sha1
    # Every device got its rollback manifest, to what it said it ran before: junk stops nothing.
    for n in devs:
        assert "error" not in rec["devices"][n]["rolled_back"], (n, rec["devices"][n])
        m = signed(K.manifest(n))
        assert (m["rollout_id"], m["action"], m["artifact"]["sha256"]) == ("r2", "rollback", sha1), (n, m)
    stored = signed(K.rollout("r2"))
    assert stored["state"] == "aborted" and stored["devices"] == json.loads(json.dumps(rec["devices"]))
    wait_for(lambda: all(devs[n].running_sha() == sha1 for n in honest), 60, "the honest devices back on v1")

    # The stopped devices come back (their agents overwrite the junk): they end on v1 too.
    for n in junk:
        devs[n].start()
    wait_for(lambda: all((devs[n].local_status().get("last") or {}).get("rollout_id") == "r2" for n in junk), 90,
             "the returning devices to apply their rollback")
    assert all(devs[n].running_sha() == sha1 for n in devs)
