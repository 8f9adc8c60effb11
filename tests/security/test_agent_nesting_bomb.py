"""Finding 1: a 4 KB JSON nesting bomb as the device's manifest crashed the agent (RecursionError).

The manifest is parsed with ``bounded.loads``: the bomb is refused as ``too-deep`` before the parser
runs, recorded like any refused manifest, and the agent keeps serving and polling.
"""

from __future__ import annotations

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy.store import FleetKeys

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_nesting_bomb_manifest_is_refused_and_the_agent_keeps_serving(agents, publisher, s3_store, tmp_path):
    dev = agents("bomb0", ORIN)
    v1, v2 = (publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=40 + i)) for i in (1, 2))
    publisher.publish("bomb0", publisher.manifest("bomb0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx")))
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")

    bomb = b"[" * 2048 + b"]" * 2048  # 4 KB: json.loads recurses past Python's limit on it
    etag = s3_store.put(FleetKeys("lab").manifest("bomb0"), bomb)
    st = wait_for(lambda: (publisher.status("bomb0").get("rejected") or {}).get("etag") == etag
                  and publisher.status("bomb0"), 60, "the agent to refuse the nesting bomb")
    assert st["rejected"]["reason"] == "too-deep", st["rejected"]
    assert dev.proc.poll() is None, "the agent died on the nesting bomb"
    assert dev.running_sha() == v1["sha256"] and st["current"]["sha256"] == v1["sha256"]
    assert not dev.saw("RecursionError") and not dev.saw("Traceback")

    # Still polling: the next good manifest installs.
    publisher.publish("bomb0", publisher.manifest("bomb0", ORIN, 2, v2, publisher.golden(tmp_path / "v2.onnx")))
    wait_for(lambda: dev.running_sha() == v2["sha256"], 60, "v2 installed after the refusal")
