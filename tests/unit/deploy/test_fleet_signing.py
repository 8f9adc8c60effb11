"""Manifest signing and the checks a device makes before downloading anything."""

from __future__ import annotations

import copy
import os
import stat
import time

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy import signing
from edgeslim.deploy.manifest import Artifact, Manifest, ManifestRejected, verify_manifest

SHA = "ab" * 32


def _manifest(**kw) -> Manifest:
    now = time.time()
    base = dict(fleet="f", device_id="d0", device_class="orin-sm87-jp6.1-trt10.3", rollout_id="r1",
                sequence=5, issued_at=now, expires_at=now + 60, action="install",
                artifact=Artifact(key=f"artifacts/sha256/{SHA}", sha256=SHA, size=10),
                model={"name": "m", "version": "3", "alias": "edge-candidate", "run_id": "abc"},
                health_check={"atol": 1e-3})
    base.update(kw)
    return Manifest(**base)


def _verify(env, pub, **kw):
    args = dict(fleet="f", device_id="d0", device_class="orin-sm87-jp6.1-trt10.3", last_sequence=4)
    args.update(kw)
    return verify_manifest(env, pub, **args)


def test_keygen_writes_private_key_owner_only_and_refuses_to_overwrite(tmp_path):
    priv, pub = signing.generate_keypair(tmp_path)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        signing.generate_keypair(tmp_path)


def test_signed_manifest_round_trips_with_all_fields(keys):
    priv, pub = keys
    m = _manifest(previous={"artifact": {"sha256": SHA}})
    got = _verify(m.sign(priv), pub)
    assert got == m
    d = got.to_dict()
    for field in ("rollout_id", "sequence", "expires_at", "model", "device_class", "artifact",
                  "health_check", "previous"):
        assert field in d


def test_a_changed_field_breaks_the_signature(keys):
    priv, pub = keys
    env = _manifest().sign(priv)
    forged = copy.deepcopy(env)
    forged["signed"]["artifact"]["sha256"] = "cd" * 32
    with pytest.raises(ManifestRejected) as exc:
        _verify(forged, pub)
    assert exc.value.reason == "signature"


def test_a_manifest_signed_by_another_key_is_refused(keys, tmp_path):
    _, pub = keys
    other_priv, _ = signing.generate_keypair(tmp_path / "attacker")
    env = _manifest().sign(signing.load_private_key(other_priv))
    with pytest.raises(ManifestRejected, match="not signed by a trusted key") as exc:
        _verify(env, pub)
    assert exc.value.reason == "signature"


def test_unsigned_or_garbage_is_refused(keys):
    _, pub = keys
    for env in (None, {}, {"signed": {}}, {"signed": {"a": 1}, "signatures": []}, "x"):
        with pytest.raises(ManifestRejected) as exc:
            _verify(env, pub)
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
    priv, pub = keys
    env = _manifest(**change).sign(priv)
    with pytest.raises(ManifestRejected) as exc:
        _verify(env, pub)
    assert exc.value.reason == reason


def test_key_rotation_trusts_old_and_new(keys, tmp_path):
    priv, pub = keys
    new_priv, new_pub = signing.generate_keypair(tmp_path / "new")
    trusted = {**pub, **signing.load_public_keys(new_pub)}
    assert _verify(_manifest().sign(priv), trusted).sequence == 5
    assert _verify(_manifest().sign(signing.load_private_key(new_priv)), trusted).sequence == 5


def test_bad_artifact_fields_are_refused():
    with pytest.raises(ManifestRejected, match="64 lowercase hex"):
        Artifact(key="k", sha256="xyz", size=1)
    with pytest.raises(ManifestRejected, match="positive"):
        Artifact(key="k", sha256=SHA, size=0)
    with pytest.raises(ManifestRejected, match="needs an artifact"):
        _manifest(artifact=None)
