"""Finding 4: two controllers of one fleet.

- A second controller whose clock runs 1000 s ahead cannot take the live lock: the lease is
  judged by the store's clock. Its ``reconcile`` (the CronJob) leaves the locked rollout alone and
  its ``create`` is refused.
- A manifest write by another writer between a controller's read of a device's manifest and its
  own put makes the controller stop (the put is fenced with ``If-Match``) instead of overwriting;
  the rollout is resumed later from its record, with nothing lost.
- A device that sees a second manifest under a sequence it already applied, with other content
  (two controllers signing with one key), refuses it: ``equivocation``.

Real RGW store, real ``mlflow server`` (first test), real agent processes.
"""

from __future__ import annotations

import json
import time

import pytest

from edgeslim.components.common.errors import FleetError
from edgeslim.deploy.controller import ACTIVE, WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")


class RacingStore:
    """The real store; but just before the first fenced manifest write, another writer's manifest lands."""

    def __init__(self, store, other_writer):
        self._store, self._other = store, other_writer
        self.raced: tuple[str, bytes] | None = None

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put(self, key, data, **cond):
        if self.raced is None and key.endswith("/manifest.json") and (cond.get("if_match") or
                                                                     cond.get("if_none_match_any")):
            self._store.put_json(key, self._other(key.split("/")[-2]))  # unconditional: the other writer
            self.raced = (key, self._store.get(key).data)
        return self._store.put(key, data, **cond)

    def put_json(self, key, obj, **cond):
        return self.put(key, json.dumps(obj, indent=1, sort_keys=True).encode(), **cond)


def _manifests(store, devices):
    return {d: store.get(K.manifest(d)).data for d in devices}


def test_a_clock_ahead_controller_and_a_concurrent_manifest_writer_are_fenced(
        s3_store, keys, agents, publisher, register_edge_model, tmp_path):
    devs = {n: agents(n, ORIN) for n in ("f0", "f1")}
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "90"})
    v1_path = make_onnx(tmp_path / "v1.onnx", seed=81)
    v1, sha1 = register_edge_model("sec-two", v1_path)
    v2, sha2 = register_edge_model("sec-two", make_onnx(tmp_path / "v2.onnx", seed=82))
    first = keys.controller(s3_store)
    assert first.create("r1", f"models:/sec-two/{v1}", cfg)["state"] == "succeeded"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 60, "both devices on v1")

    # 1. The first controller holds the live lock of rollout r2 (as while it runs it).
    assert first.create("r2", f"models:/sec-two/{v2}", cfg, wait=False)["state"] == "pending"
    first.acquire_lock("r2", cfg.lock_ttl_s)
    held = s3_store.get_json(K.lock)[0]
    before = _manifests(s3_store, devs)
    ahead = keys.controller(s3_store, clock=lambda: time.time() + 1000)
    assert ahead.reconcile() == []  # r2 is pending, but its lock is live by the store's clock
    with pytest.raises(FleetError, match="locked by rollout 'r2'"):
        ahead.create("r3", f"models:/sec-two/{v1}", cfg)
    with pytest.raises(FleetError, match="locked by rollout 'r2'"):
        ahead.acquire_lock("r3", cfg.lock_ttl_s)
    assert s3_store.get_json(K.lock)[0] == held and held["holder"] == first.holder
    assert _manifests(s3_store, devs) == before and first.get("r2")["state"] == "pending"
    first.release_lock()

    # 2. Another writer's manifest lands between a controller's read and its put.
    v1_art, v1_health = publisher.upload(v1_path), publisher.golden(v1_path)
    racing = RacingStore(s3_store, lambda dev: publisher.manifest(dev, ORIN, 7, v1_art, v1_health))
    with pytest.raises(FleetError, match="changed while this controller wrote it"):
        keys.controller(racing).reconcile()
    key, other = racing.raced
    raced_dev = key.split("/")[-2]
    assert s3_store.get(key).data == other  # not overwritten
    rec = first.get("r2")
    assert rec["state"] in ACTIVE and raced_dev not in rec["devices"]  # stopped before it touched that device
    assert s3_store.get(K.lock) is None
    wait_for(lambda: (devs[raced_dev].local_status().get("last") or {}).get("sequence") == 7, 60,
             "the device to apply the other writer's manifest")

    # Nothing lost: the rollout resumes from its record and ends on v2 everywhere.
    done = first.reconcile()
    assert [r["state"] for r in done] == ["succeeded"]
    assert done[0]["devices"][raced_dev]["sent"]["sequence"] > 7
    wait_for(lambda: all(d.running_sha() == sha2 for d in devs.values()), 60, "both devices on v2")


def test_device_refuses_a_second_manifest_under_an_applied_sequence(agents, publisher, tmp_path):
    dev = agents("q0", ORIN)
    paths = [make_onnx(tmp_path / f"v{i}.onnx", seed=90 + i) for i in (1, 2)]
    (a1, a2), (g1, g2) = [publisher.upload(p) for p in paths], [publisher.golden(p) for p in paths]
    publisher.publish("q0", publisher.manifest("q0", ORIN, 1, a1, g1))  # controller A
    wait_for(lambda: dev.running_sha() == a1["sha256"] and publisher.status("q0").get("applied_sequence") == 1, 60,
             "v1 applied under sequence 1")
    etag = publisher.publish("q0", publisher.manifest("q0", ORIN, 1, a2, g2))  # controller B, same key and sequence
    st = wait_for(lambda: (publisher.status("q0").get("rejected") or {}).get("etag") == etag and publisher.status("q0"),
                  60, "the device to refuse the second manifest under sequence 1")
    assert st["rejected"]["reason"] == "equivocation", st["rejected"]
    assert dev.running_sha() == a1["sha256"] and st["applied_sequence"] == 1
    # The device is not stuck: the next sequence installs.
    publisher.publish("q0", publisher.manifest("q0", ORIN, 2, a2, g2))
    wait_for(lambda: dev.running_sha() == a2["sha256"], 60, "v2 installed under sequence 2")
