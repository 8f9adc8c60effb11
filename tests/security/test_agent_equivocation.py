"""Finding 7: a second, different manifest signed under an already applied sequence was silently
ignored as "unchanged".

The agent keeps the sha256 of the canonical JSON of the signed payload it applied (and reports it
as ``last.manifest_sha256``); a same-sequence manifest with another digest is refused as
``equivocation``, while the very same manifest again is still just "unchanged".
"""

from __future__ import annotations

import hashlib

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy import signing

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_same_sequence_with_other_content_is_refused_as_equivocation(agents, publisher, tmp_path):
    dev = agents("eq0", ORIN)
    v1, v2 = (publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=100 + i)) for i in (1, 2))
    applied = publisher.manifest("eq0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx"))
    publisher.publish("eq0", applied)
    st = wait_for(lambda: (publisher.status("eq0").get("last") or {}).get("result") == "committed"
                  and publisher.status("eq0"), 60, "v1 committed")
    digest = hashlib.sha256(signing.canonical_json(applied["signed"])).hexdigest()
    assert st["last"]["manifest_sha256"] == digest

    other = publisher.manifest("eq0", ORIN, 1, v2, publisher.golden(tmp_path / "v2.onnx"))  # same sequence
    etag = publisher.publish("eq0", other)
    st = wait_for(lambda: (publisher.status("eq0").get("rejected") or {}).get("etag") == etag
                  and publisher.status("eq0"), 60, "the agent to refuse the equivocating manifest")
    assert st["rejected"]["reason"] == "equivocation", st["rejected"]
    assert digest[:12] in st["rejected"]["message"]
    assert dev.running_sha() == v1["sha256"] and st["last"]["manifest_sha256"] == digest

    since = len(dev.lines)
    publisher.publish("eq0", applied)  # the applied manifest itself again: nothing to do, nothing refused
    before = publisher.status("eq0")["heartbeat_at"]
    wait_for(lambda: publisher.status("eq0")["heartbeat_at"] > before + 1, 60, "two more heartbeats")
    assert not dev.saw("refused manifest", since) and publisher.status("eq0")["rejected"]["etag"] == etag
    assert dev.proc.poll() is None and dev.running_sha() == v1["sha256"]
