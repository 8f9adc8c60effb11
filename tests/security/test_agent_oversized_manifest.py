"""Finding 2: a 300 MB manifest was read and parsed whole before any check (631 MB RSS).

The agent reads its manifest with ``max_bytes``: the store refuses an object over the cap from
the size in the GetObject response, before reading its body, and the agent records the refusal
(with the object's ETag, so it polls past it). The cap is lowered to 64 KB with
``--max-manifest-bytes`` to keep the test cheap; the object is 1 KB over it.
"""

from __future__ import annotations

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy.store import FleetKeys

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"
CAP = 64 << 10


def test_oversized_manifest_is_refused_unread(agents, publisher, s3_store, tmp_path):
    dev = agents("big0", ORIN, extra=["--max-manifest-bytes", str(CAP)])
    v1, v2 = (publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=50 + i)) for i in (1, 2))
    publisher.publish("big0", publisher.manifest("big0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx")))
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")

    huge = b'{"signed": "' + b"A" * (CAP + 1024) + b'"}'
    etag = s3_store.put(FleetKeys("lab").manifest("big0"), huge)
    st = wait_for(lambda: (publisher.status("big0").get("rejected") or {}).get("etag") == etag
                  and publisher.status("big0"), 60, "the agent to refuse the oversized manifest")
    assert st["rejected"]["reason"] == "oversized", st["rejected"]
    assert f"{len(huge)} bytes, over the cap of {CAP}: refused unread" in st["rejected"]["message"]
    assert dev.saw("refused unread")
    assert dev.proc.poll() is None
    assert dev.running_sha() == v1["sha256"] and st["current"]["sha256"] == v1["sha256"]

    publisher.publish("big0", publisher.manifest("big0", ORIN, 2, v2, publisher.golden(tmp_path / "v2.onnx")))
    wait_for(lambda: dev.running_sha() == v2["sha256"], 60, "v2 installed after the refusal")
