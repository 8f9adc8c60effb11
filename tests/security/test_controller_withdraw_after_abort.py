"""Finding 3c: after a failed rollout, a withdraw returns each device to what it ran before.

v0 runs everywhere (rollout r0); rollout A installs v1; rollout B of a bad v2 fails its canary
and is aborted (the canary is rolled back to v1, by a manifest of rollout B). Withdrawing A
must then bring *every* device A touched back to v0, what each device said it ran when A
reached it: the canary's newest manifest belongs to B, but it only rolled back to A's model,
so it does not "supersede" A. Neither device may stay on the withdrawn v1, nor reach v2.
Real RGW store, real ``mlflow server``, real agent processes.
"""

from __future__ import annotations

import pytest

from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")


def test_withdraw_after_a_failed_rollout_returns_devices_to_what_they_ran(
        s3_store, keys, agents, register_edge_model, tmp_path):
    devs = {n: agents(n, ORIN) for n in ("w0", "w1")}
    c = keys.controller(s3_store)

    def cfg(waves):
        return WaveRolloutConfig.from_strings({"waves": waves, "max_failure_pct": "10", "poll_interval_s": "0.2",
                                               "wave_timeout_s": "90"})

    def on(sha):
        return wait_for(lambda: all(d.running_sha() == sha for d in devs.values()), 90, f"every device on {sha[:12]}")

    v0, sha0 = register_edge_model("sec-withdraw", make_onnx(tmp_path / "v0.onnx", seed=60))
    assert c.create("r0", f"models:/sec-withdraw/{v0}", cfg("100"))["state"] == "succeeded"
    on(sha0)
    v1_path = make_onnx(tmp_path / "v1.onnx", seed=61)
    v1, sha1 = register_edge_model("sec-withdraw", v1_path)
    a = c.create("A", f"models:/sec-withdraw/{v1}", cfg("100"))
    assert a["state"] == "succeeded" and {d["before"] for d in a["devices"].values()} == {sha0}
    on(sha1)
    # v2's golden outputs were recorded on v1: its canary fails the health check.
    v2, sha2 = register_edge_model("sec-withdraw", make_onnx(tmp_path / "v2.onnx", seed=62), golden_from=v1_path)
    b = c.create("B", f"models:/sec-withdraw/{v2}", cfg("50,100"))
    assert b["state"] == "aborted"
    canary = b["waves"][0]["devices"][0]
    assert list(b["devices"]) == [canary] and b["devices"][canary]["outcome"] == "failed"
    m = s3_store.get_json(K.manifest(canary))[0]["signed"]
    assert (m["rollout_id"], m["action"], m["artifact"]["sha256"]) == ("B", "rollback", sha1)
    on(sha1)

    rec = c.withdraw("A")
    assert rec["state"] == "withdrawn"
    for dev, d in rec["devices"].items():
        assert "skipped" not in d["rolled_back"] and "error" not in d["rolled_back"], (dev, d["rolled_back"])
        m = s3_store.get_json(K.manifest(dev))[0]["signed"]
        assert (m["rollout_id"], m["action"], m["artifact"]["sha256"]) == ("A", "rollback", sha0), (dev, m)
    assert s3_store.get_json(K.rollout("A"))[0]["signed"]["state"] == "withdrawn"
    wait_for(lambda: all((d.local_status().get("last") or {}).get("rollout_id") == "A" for d in devs.values()), 90,
             "every device to decide A's rollback")
    assert all(d.local_status()["last"]["result"] == "committed" for d in devs.values())
    on(sha0)
