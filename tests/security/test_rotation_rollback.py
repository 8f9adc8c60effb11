"""Finding 3d: a key rotation does not turn a rollback into a withdraw.

v1 runs on every device, installed under the first fleet key. Root version 2 (a new root key
and a NEW fleet key; signed by the old and the new root keys) is published in the store; the
devices follow it on their own. The old fleet key is now refused, by the controller and by the
devices. A rollout of a bad v2 signed with the new fleet key fails its canary: the canary is
rolled back to v1 (its target, signed by the retired key, is derived again from MLflow through
v1's release statement and signed anew), not withdrawn; the other device is never touched. The
inventory the retired key signed is no longer believed: the operator enrols the devices again
(from their own signed registrations; no device is touched).
Real RGW store, real ``mlflow server``, real agent processes.
"""

from __future__ import annotations

import json

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy import signing, trust
from edgeslim.deploy.controller import Controller, WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")


def test_rollback_after_a_fleet_key_rotation_goes_back_to_the_old_model(
        s3_store, keys, agents, publisher, register_edge_model, tmp_path):
    devs = {n: agents(n, ORIN) for n in ("k0", "k1")}
    cfg = WaveRolloutConfig.from_strings({"waves": "50,100", "max_failure_pct": "10", "poll_interval_s": "0.2",
                                          "wave_timeout_s": "90"})
    v1_path = make_onnx(tmp_path / "v1.onnx", seed=71)
    v1, sha1 = register_edge_model("sec-rotate", v1_path)
    assert keys.controller(s3_store).create("r1", f"models:/sec-rotate/{v1}", cfg)["state"] == "succeeded"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 60, "both devices on v1")

    # Rotate: root version 2 with a new root key and a new fleet key, published in the store only.
    new_root = signing.load_private_key(signing.generate_keypair(tmp_path / "new-root", role="root")[0])
    new_fleet = signing.load_private_key(signing.generate_keypair(tmp_path / "new-fleet", role="fleet")[0])
    payload = trust.make_root(root_keys=[new_root], release_keys=[keys.release_key], fleet_keys=[new_fleet],
                              version=2, fleet="lab")
    s3_store.put_json(K.root(2), trust.sign_with(payload, [keys.root_key, new_root]))

    def signed(key):
        got = s3_store.get_json(key)
        return got[0]["signed"] if got else {}

    wait_for(lambda: all((signed(K.status(n)).get("metadata") or {}).get("root_version") == 2 for n in devs), 60,
             "the devices to accept root version 2")
    assert all(d.saw("accepted root version 2") for d in devs.values())
    assert all((d.state_dir / "roots" / "2.root.json").exists() for d in devs.values())

    # The retired fleet key is refused: by a controller, and by a device.
    with pytest.raises(ConfigError, match="not a fleet key of root version 2"):
        keys.controller(s3_store).create("r-old", f"models:/sec-rotate/{v1}", cfg)
    etag = publisher.publish("k1", publisher.manifest("k1", ORIN, 1000, publisher.upload(v1_path),
                                                      publisher.golden(v1_path)))
    st = wait_for(lambda: (signed(K.status("k1")).get("rejected") or {}).get("etag") == etag and signed(K.status("k1")),
                  60, "k1 to refuse the retired key's manifest")
    assert st["rejected"]["reason"] == "signature"

    # A bad v2 under the new fleet key: its golden outputs were recorded on v1.
    v2, sha2 = register_edge_model("sec-rotate", make_onnx(tmp_path / "v2.onnx", seed=72), golden_from=v1_path)
    c = Controller(s3_store, "lab", signing_key=new_fleet, root=keys.root)  # provisioned with root version 1
    # The inventory was signed by the retired key: the operator enrols the devices again, from their
    # own signed registrations (on the controller's side; no device is touched).
    with pytest.raises(signing.SignatureError, match="enrol the devices again"):
        c.devices()
    for n in devs:
        c.enrol(n)
    assert sorted(c.devices()) == sorted(devs)
    rec = c.create("r2", f"models:/sec-rotate/{v2}", cfg)
    assert c.root.version == 2
    assert rec["state"] == "aborted"
    canary = rec["waves"][0]["devices"][0]
    other = next(n for n in devs if n != canary)
    assert list(rec["devices"]) == [canary] and rec["devices"][canary]["outcome"] == "failed"
    assert rec["devices"][canary]["before"] == sha1
    assert rec["devices"][canary]["rolled_back"]["action"] == "rollback"
    m = signed(K.manifest(canary))
    assert (m["rollout_id"], m["action"], m["artifact"]["sha256"]) == ("r2", "rollback", sha1), m
    root2 = trust.Root(payload)
    root2.verify(s3_store.get_json(K.manifest(canary))[0], "fleet", what="rollback manifest")
    # v1's target was derived again and signed by the new fleet key.
    target = root2.verify(s3_store.get_json(K.target(sha1))[0], "fleet", what="v1's target")
    assert target["artifact"]["sha256"] == sha1 and target["model"]["version"] == v1

    wait_for(lambda: (devs[canary].local_status().get("last") or {}).get("action") == "rollback", 60,
             "the canary to apply its rollback")
    last = devs[canary].local_status()["last"]
    assert last["result"] == "committed" and last["rollout_id"] == "r2"
    assert devs[canary].running_sha() == sha1 and devs[other].running_sha() == sha1
    assert signed(K.manifest(other))["rollout_id"] == "r1"  # never touched by r2
    for d in devs.values():
        d.stop()
        assert "withdraw" not in json.dumps(json.loads((d.state_dir / "agent.json").read_text())["last"])
