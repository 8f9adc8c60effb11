"""Finding 5: devices are not believed on their word.

- A registration written at ``devices/d9/registration.json`` that claims to be device ``n1``
  (self-signed with the writer's own key), or that claims a path as its id, is ignored: it is
  neither a registration of ``n1`` nor of ``d9``, and cannot be enrolled.
- The canary of a rollout is offline (its agent process is stopped), so only a forged status can
  answer for it: a bucket writer writes "committed" for exactly the manifest it was sent
  (sequence and digest), unsigned, then signed with an attacker's key, then signed with the
  *other* device's real key. None is believed: ``edge-canary`` does not move, wave 2 is never
  released, the silent canary fails the rollout, which is rolled back.

Real RGW store, real ``mlflow server``, real agent processes.
"""

from __future__ import annotations

import copy
import time

import pytest

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy import signing, trust
from edgeslim.deploy.controller import WaveRolloutConfig, wave_plan
from edgeslim.deploy.manifest import manifest_digest
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN, XAVIER = "orin-sm87-jp6.1-trt10.3", "xavier-sm72-jp5.1-trt8.5"
K = FleetKeys("lab")


def test_claimed_identities_and_forged_canary_statuses_are_not_believed(
        s3_store, keys, agents, register_edge_model, tmp_path, caplog):
    from mlflow import MlflowClient

    names = ["n0", "n1"]
    devs = {n: agents(n, ORIN) for n in names}
    c = keys.controller(s3_store)
    honest = c.registrations()
    assert sorted(honest) == names

    # 1. Registrations that claim another device's id, or a path.
    attacker = signing.load_private_key(signing.generate_keypair(tmp_path / "attacker")[0])

    def registration(claim, device_class=ORIN):
        return trust.sign_with({"device_id": claim, "device_class": device_class, "fleet": "lab", "agent_version": 1,
                                "hostname": "evil", "registered_at": time.time(),
                                "public_key": trust.public_b64(attacker), "root_version": 1}, [attacker])

    s3_store.put_json(K.registration("d9"), registration("n1", XAVIER))
    s3_store.put_json(K.registration("d8"), registration("../../lock"))
    caplog.set_level("WARNING", logger="edgeslim.controller")
    regs = c.registrations()
    assert sorted(regs) == names and regs["n1"]["public_key"] == honest["n1"]["public_key"]
    assert "registration under fleets/lab/devices/d9/registration.json claims lab/n1" in caplog.text
    assert "claims lab/../../lock" in caplog.text
    assert sorted(c.pending()) == []
    with pytest.raises(FleetError, match="'d9' has not registered"):
        c.enrol("d9")
    with pytest.raises(ConfigError, match="device name"):
        c.enrol("../../lock")
    assert {d: v["public_key"] for d, v in c.devices().items()} == {d: honest[d]["public_key"] for d in names}
    assert c.devices()["n1"]["device_class"] == ORIN

    # 2. A forged "committed" for an offline canary.
    cfg = WaveRolloutConfig.from_strings({"waves": "50,100", "max_failure_pct": "10", "poll_interval_s": "0.2",
                                          "wave_timeout_s": "20"})
    v1, sha1 = register_edge_model("sec-identity", make_onnx(tmp_path / "v1.onnx", seed=101))
    assert c.create("r1", f"models:/sec-identity/{v1}", cfg)["state"] == "succeeded"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 60, "both devices on v1")
    v2, sha2 = register_edge_model("sec-identity", make_onnx(tmp_path / "v2.onnx", seed=102))
    canary = wave_plan("r2", names, cfg.waves)[0][0]
    other = next(n for n in names if n != canary)
    devs[canary].stop()
    real = s3_store.get_json(K.status(canary))[0]["signed"]
    other_key = signing.load_private_key(devs[other].state_dir / "device.key")
    other_manifest = s3_store.get(K.manifest(other)).data
    polls = {"n": 0}

    def sleep(seconds):
        env = (s3_store.get_json(K.manifest(canary)) or [None])[0]
        if env and env["signed"]["rollout_id"] == "r2":
            m = env["signed"]
            forged = copy.deepcopy(real)
            forged.update(applied_sequence=m["sequence"], rollout_id="r2", state="idle", heartbeat_at=time.time(),
                          current={"sha256": sha2, "backend": "onnxruntime", "fallback": None, "model": m["model"]},
                          last={"sequence": m["sequence"], "rollout_id": "r2", "action": "install",
                                "result": "committed", "reason": None, "health": {"ok": True}, "at": time.time(),
                                "sha256": sha2, "manifest_sha256": manifest_digest(m)})
            polls["n"] += 1
            n = polls["n"]
            if n <= 10:
                body = {"signed": forged, "signatures": []}
            elif n <= 20:
                body = trust.sign_with(forged, [attacker])
            else:
                body = trust.sign_with(forged, [other_key])  # the other device speaking for the canary
            s3_store.put_json(K.status(canary), body)
        time.sleep(seconds)

    rec = keys.controller(s3_store, sleep=sleep).create("r2", f"models:/sec-identity/{v2}", cfg)
    assert polls["n"] > 20, "the wave ended before every forgery was tried"
    assert rec["state"] == "aborted" and "1 of 1 reported devices failed" in rec["reason"]
    assert list(rec["devices"]) == [canary] and rec["devices"][canary]["outcome"] == "silent"
    assert [w["state"] for w in rec["waves"]] == ["done", "planned"]  # wave 2 never released
    assert s3_store.get(K.manifest(other)).data == other_manifest
    assert f"device {canary}: status ignored: status of {canary} carries no signature list" in caplog.text
    assert f"device {canary}: status ignored: status of {canary} is not signed by the device's enrolled key" \
        in caplog.text
    aliases = MlflowClient().get_registered_model("sec-identity").aliases
    assert str(aliases["edge-canary"]) == v1 and str(aliases["edge-stable"]) == v1
    m = s3_store.get_json(K.manifest(canary))[0]["signed"]
    assert (m["action"], m["artifact"]["sha256"]) == ("rollback", sha1)

    # The canary comes back: it never ran v2, and applies its rollback to what it runs.
    devs[canary].start()
    wait_for(lambda: (devs[canary].local_status().get("last") or {}).get("action") == "rollback", 60,
             "the canary to apply its rollback")
    assert devs[canary].running_sha() == sha1 and devs[other].running_sha() == sha1
    assert not devs[canary].saw(sha2[:12])
