"""A real agent process refuses forged, altered, replayed, expired and wrong-class manifests."""

from __future__ import annotations

import copy

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy import signing

pytestmark = pytest.mark.slow
ORIN, XAVIER = "orin-sm87-jp6.1-trt10.3", "xavier-sm72-jp5.1-trt8.5"


def test_agent_refuses_bad_manifests_and_keeps_its_model(agents, publisher, tmp_path):
    dev = agents("s0", ORIN)
    v1, v2 = (publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=10 + i)) for i in (1, 2))
    g1, g2 = publisher.golden(tmp_path / "v1.onnx"), publisher.golden(tmp_path / "v2.onnx")
    first = publisher.manifest("s0", ORIN, 1, v1, g1)
    publisher.publish("s0", first)
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")

    def refused(envelope, reason):
        etag = publisher.publish("s0", envelope)
        st = wait_for(lambda: (publisher.status("s0").get("rejected") or {}).get("etag") == etag
                      and publisher.status("s0"), 30, f"the agent to refuse ({reason})")
        assert st["rejected"]["reason"] == reason, st["rejected"]
        assert dev.running_sha() == v1["sha256"]

    attacker, _ = signing.generate_keypair(tmp_path / "attacker")
    refused(publisher.manifest("s0", ORIN, 2, v2, g2, key=signing.load_private_key(attacker)), "signature")
    altered = copy.deepcopy(publisher.manifest("s0", ORIN, 2, v1, g1))
    altered["signed"]["artifact"] = dict(v2)  # same signature, different artifact
    refused(altered, "signature")
    refused(publisher.manifest("s0", ORIN, 2, v2, g2, expires_in=-10), "expired")
    refused(publisher.manifest("s0", XAVIER, 2, v2, g2), "wrong-class")
    publisher.publish("s0", publisher.manifest("s0", ORIN, 2, v2, g2))
    wait_for(lambda: dev.running_sha() == v2["sha256"], 60, "v2 installed")
    etag = publisher.publish("s0", first)  # replay the older, validly signed manifest
    st = wait_for(lambda: (publisher.status("s0").get("rejected") or {}).get("etag") == etag
                  and publisher.status("s0"), 30, "the agent to refuse the replay")
    assert st["rejected"]["reason"] == "replay"
    assert dev.running_sha() == v2["sha256"] and st["applied_sequence"] == 2
    assert dev.saw("refused manifest")
