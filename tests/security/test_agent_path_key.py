"""Finding 5: a signed manifest with the artifact key ``../../etc/hostname`` was refused only by an
uncaught error (the agent exited).

An artifact's key must be ``artifact_key(sha256)`` (content-addressed): anything else is a
``malformed`` manifest, refused before a byte is fetched. A local store refuses such a key too,
with a clear FleetError.
"""

from __future__ import annotations

import copy

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.components.common.errors import FleetError
from edgeslim.deploy import signing
from edgeslim.deploy.store import LocalStore

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_signed_path_traversal_key_is_refused_as_malformed(agents, publisher, tmp_path):
    dev = agents("path0", ORIN)
    v1, v2 = (publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=80 + i)) for i in (1, 2))
    publisher.publish("path0", publisher.manifest("path0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx")))
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")

    # Validly signed by the fleet's own key, so only the key check stands in the way.
    payload = copy.deepcopy(publisher.manifest("path0", ORIN, 2, v2, publisher.golden(tmp_path / "v2.onnx"))["signed"])
    payload["artifact"]["key"] = "../../etc/hostname"
    etag = publisher.publish("path0", signing.sign(payload, publisher.key))
    st = wait_for(lambda: (publisher.status("path0").get("rejected") or {}).get("etag") == etag
                  and publisher.status("path0"), 60, "the agent to refuse the traversal key")
    assert st["rejected"]["reason"] == "malformed", st["rejected"]
    assert "../../etc/hostname" in st["rejected"]["message"] and "artifacts/sha256/" in st["rejected"]["message"]
    assert dev.proc.poll() is None
    assert dev.running_sha() == v1["sha256"] and st["applied_sequence"] == 1

    local = LocalStore(tmp_path / "local-store")
    for key in ("../../etc/hostname", "/etc/hostname", "artifacts/../../x"):
        with pytest.raises(FleetError, match="must be relative without '..'"):
            b"".join(local.stream(key))
        with pytest.raises(FleetError, match="must be relative without '..'"):
            local.get(key)
