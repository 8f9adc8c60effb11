"""The fleet's signed sequence statement: what the controller publishes, and what a device accepts."""

from __future__ import annotations

import time

import pytest

from edgeslim.deploy import signing, trust
from edgeslim.deploy.store import FleetKeys
from tests.unit.deploy.fleet_unit_helpers import ManifestWriter


def test_the_controller_rebuilds_merges_and_never_lowers_the_statement(keys, store):
    kit, root = keys
    c = kit.controller(store)
    w = ManifestWriter(store, kit, fleet="f", device="d0")
    w.send(None, None, action="withdraw", seq=7)
    store.delete(FleetKeys("f").sequences)  # gone: rebuilt from the manifests this fleet signed
    st = c.publish_timestamp() and store.get_json(FleetKeys("f").sequences)[0]
    got = trust.verify_sequences(st, root, fleet="f", now=time.time())
    assert got["sequences"] == {"d0": 7} and got["expires_at"] > time.time()
    w.publish(w.manifest(None, None, action="withdraw", seq=3).sign(kit.fleet_key))  # a replay put back
    c.fleet_trust.note_sequence("d1", 2)
    again = c.fleet_trust.publish_sequences()
    assert again["sequences"] == {"d0": 7, "d1": 2} and again["version"] > got["version"]


def test_a_device_refuses_an_expired_foreign_or_forged_statement(keys, tmp_path):
    kit, root = keys
    now = time.time()
    good = trust.sequences_payload(fleet="f", version=1, root_version=1, sequences={"d0": 4}, ttl_s=60, now=now)
    assert trust.verify_sequences(trust.sign_with(good, [kit.fleet_key]), root, fleet="f", now=now)["sequences"] == {
        "d0": 4}
    with pytest.raises(signing.SignatureError, match="expired"):
        trust.verify_sequences(trust.sign_with(good, [kit.fleet_key]), root, fleet="f", now=now + 61)
    with pytest.raises(signing.SignatureError, match="not 'g'"):
        trust.verify_sequences(trust.sign_with(good, [kit.fleet_key]), root, fleet="g", now=now)
    with pytest.raises(signing.SignatureError, match="fleet key"):  # the release key is not the fleet role
        trust.verify_sequences(trust.sign_with(good, [kit.release_key]), root, fleet="f", now=now)
    bad = dict(good, sequences={"d0": "9"})
    with pytest.raises(signing.SignatureError, match="malformed"):
        trust.verify_sequences(trust.sign_with(bad, [kit.fleet_key]), root, fleet="f", now=now)
