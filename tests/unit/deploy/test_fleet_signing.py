"""Manifest signing and the checks a device makes before downloading anything."""

from __future__ import annotations

import copy
import os
import stat
import time

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy import signing, trust
from edgeslim.deploy.manifest import Artifact, Manifest, ManifestRejected, verify_manifest

SHA = "ab" * 32


def _manifest(kit=None, **kw) -> Manifest:
    now = time.time()
    art = Artifact(key=f"artifacts/sha256/{SHA}", sha256=SHA, size=10)
    base = dict(fleet="f", device_id="d0", device_class="orin-sm87-jp6.1-trt10.3", rollout_id="r1",
                sequence=5, issued_at=now, expires_at=now + 60, action="install", artifact=art,
                model={"name": "m", "version": "3", "alias": "edge-candidate", "run_id": "abc"},
                health_check={"atol": 1e-3},
                release=kit.release({"sha256": SHA, "size": 10}, name="m", version="3") if kit else None)
    base.update(kw)
    return Manifest(**base)


def _verify(env, root, **kw):
    args = dict(fleet="f", device_id="d0", device_class="orin-sm87-jp6.1-trt10.3", last_sequence=4)
    args.update(kw)
    return verify_manifest(env, root, **args)


def test_keygen_writes_private_key_owner_only_and_refuses_to_overwrite(tmp_path):
    priv, pub = signing.generate_keypair(tmp_path)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        signing.generate_keypair(tmp_path)


def test_signed_manifest_round_trips_with_all_fields(keys):
    kit, root = keys
    m = _manifest(kit, previous={"sha256": SHA})
    got = _verify(m.sign(kit.fleet_key), root)
    assert got == m
    d = got.to_dict()
    for field in ("rollout_id", "sequence", "expires_at", "model", "device_class", "artifact",
                  "health_check", "previous", "release"):
        assert field in d


def test_a_changed_field_breaks_the_signature(keys):
    kit, root = keys
    env = _manifest(kit).sign(kit.fleet_key)
    forged = copy.deepcopy(env)
    forged["signed"]["artifact"]["sha256"] = "cd" * 32
    with pytest.raises(ManifestRejected) as exc:
        _verify(forged, root)
    assert exc.value.reason == "signature"


def test_a_manifest_signed_by_another_key_is_refused(keys, tmp_path):
    kit, root = keys
    other_priv, _ = signing.generate_keypair(tmp_path / "attacker")
    env = _manifest(kit).sign(signing.load_private_key(other_priv))
    with pytest.raises(ManifestRejected, match="signed by 0 of the 1 fleet key") as exc:
        _verify(env, root)
    assert exc.value.reason == "signature"


def test_unsigned_or_garbage_is_refused(keys):
    _, root = keys
    for env in (None, {}, {"signed": {}}, {"signed": {"a": 1}, "signatures": []}, "x"):
        with pytest.raises(ManifestRejected) as exc:
            _verify(env, root)
        assert exc.value.reason == "signature"


@pytest.mark.parametrize("change,reason", [
    ({"sequence": 4}, "replay"),
    ({"sequence": 2}, "replay"),
    ({"expires_at": time.time() - 1}, "expired"),
    ({"device_class": "xavier-sm72-jp5.1-trt8.5"}, "wrong-class"),
    ({"device_id": "d1"}, "wrong-device"),
    ({"fleet": "other"}, "wrong-device"),
])
def test_device_refuses_replay_expiry_and_wrong_target(keys, change, reason):
    kit, root = keys
    env = _manifest(kit, **change).sign(kit.fleet_key)
    with pytest.raises(ManifestRejected) as exc:
        _verify(env, root)
    assert exc.value.reason == reason


def test_the_fleet_key_alone_cannot_install_an_ungated_model(keys, tmp_path):
    """Two roles must agree: the director's manifest and the release statement of the gate."""
    kit, root = keys
    sign = kit.fleet_key
    cases = {
        "no release statement": _manifest(),
        "release signed by the fleet key": _manifest(release=trust.sign_with(
            trust.release_payload(name="m", version="3", artifact={"sha256": SHA, "size": 10}, engines={},
                                  gate={"passed": True}), [kit.fleet_key])),
        "release of another artifact": _manifest(release=kit.release({"sha256": "cd" * 32, "size": 10},
                                                                      name="m", version="3")),
        "release of another version": _manifest(release=kit.release({"sha256": SHA, "size": 10},
                                                                     name="m", version="2")),
        "expired release": _manifest(release=kit.release({"sha256": SHA, "size": 10}, name="m", version="3",
                                                          expires_s=-1)),
        "manifest outlives its release": _manifest(
            expires_at=time.time() + 7200,
            release=kit.release({"sha256": SHA, "size": 10}, name="m", version="3", expires_s=3600)),
        "engine not in the release": _manifest(kit, engine=Artifact(key=f"artifacts/sha256/{'ef' * 32}",
                                                                   sha256="ef" * 32, size=5)),
    }
    for what, m in cases.items():
        with pytest.raises(ManifestRejected) as exc:
            _verify(m.sign(sign), root)
        assert exc.value.reason == "release", (what, str(exc.value))
    with pytest.raises(ConfigError, match="did not pass its gate"):
        trust.release_payload(name="m", version="3", artifact={"sha256": SHA, "size": 10}, engines={},
                              gate={"passed": False, "summary": "top-1 fell 4 pt"})
    assert _verify(_manifest(kit).sign(sign), root).sequence == 5


def test_root_rotation_needs_the_old_and_the_new_root_keys(keys, tmp_path):
    """Rotation replaces the fleet key without touching a device; a forged rotation is refused."""
    kit, root = keys
    new_fleet = signing.load_private_key(signing.generate_keypair(tmp_path / "n", role="fleet")[0])
    new_root = signing.load_private_key(signing.generate_keypair(tmp_path / "n", role="root")[0])
    payload = trust.make_root(root_keys=[new_root], release_keys=[kit.release_key], fleet_keys=[new_fleet],
                              version=2, fleet="f")
    for signers in ([new_root], [kit.root_key]):  # only one side signed: refused
        with pytest.raises(signing.SignatureError):
            root.successor(trust.sign_with(payload, signers))
    with pytest.raises(signing.SignatureError, match="expected 2"):
        root.successor(trust.sign_with(dict(payload, version=3), [kit.root_key, new_root]))
    v2 = root.successor(trust.sign_with(payload, [kit.root_key, new_root]))
    m = _manifest(kit)
    assert _verify(m.sign(new_fleet), v2).sequence == 5
    with pytest.raises(ManifestRejected) as exc:  # the old fleet key is revoked by version 2
        _verify(m.sign(kit.fleet_key), v2)
    assert exc.value.reason == "signature"


def test_thresholds_count_distinct_keys(tmp_path):
    ks = [signing.load_private_key(signing.generate_keypair(tmp_path / str(i), role="fleet")[0]) for i in range(3)]
    payload = trust.make_root(root_keys=ks[:1], release_keys=ks[:1], fleet_keys=ks, thresholds={"fleet": 2})
    root = trust.Root(payload)
    doc = {"type": "x"}
    with pytest.raises(signing.SignatureError, match="signed by 1 of the 2"):
        root.verify(trust.sign_with(doc, [ks[0], ks[0]]), "fleet", what="doc")  # the same key twice is one
    assert root.verify(trust.sign_with(doc, [ks[0], ks[2]]), "fleet", what="doc") == doc
    with pytest.raises(ConfigError, match="threshold of role fleet"):
        trust.make_root(root_keys=ks[:1], release_keys=ks[:1], fleet_keys=ks[:1], thresholds={"fleet": 2})


def test_bad_artifact_fields_are_refused():
    with pytest.raises(ManifestRejected, match="64 lowercase hex"):
        Artifact(key="k", sha256="xyz", size=1)
    with pytest.raises(ManifestRejected, match="positive"):
        Artifact(key="k", sha256=SHA, size=0)
    with pytest.raises(ManifestRejected, match="needs an artifact"):
        _manifest(artifact=None)
