"""Finding 3: a signed manifest whose artifact is missing from the store made the agent exit 2,
on every restart.

The missing object (a 404) is the result ``failed`` of that sequence, with a reason naming the key;
the agent keeps serving, and after a restart it does not try that manifest again.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for
from edgeslim.deploy.manifest import artifact_key

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_missing_artifact_fails_the_sequence_and_the_agent_keeps_running(agents, publisher, tmp_path):
    dev = agents("miss0", ORIN)
    v1 = publisher.upload(make_onnx(tmp_path / "v1.onnx", seed=60))
    publisher.publish("miss0", publisher.manifest("miss0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx")))
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")

    ghost_bytes = make_onnx(tmp_path / "ghost.onnx", seed=61).read_bytes()  # never uploaded
    sha = hashlib.sha256(ghost_bytes).hexdigest()
    ghost = {"key": artifact_key(sha), "sha256": sha, "size": len(ghost_bytes), "format": "onnx", "metadata": {}}
    publisher.publish("miss0", publisher.manifest("miss0", ORIN, 2, ghost, publisher.golden(tmp_path / "v1.onnx")))
    st = wait_for(lambda: ((publisher.status("miss0").get("last") or {}).get("sequence") == 2
                           and publisher.status("miss0").get("state") == "idle" and publisher.status("miss0")),
                  60, "the agent to report the missing artifact")
    assert st["last"]["result"] == "failed" and artifact_key(sha) in st["last"]["reason"], st["last"]
    assert "not in the store" in st["last"]["reason"]
    assert dev.proc.poll() is None, "the agent exited on a missing artifact"
    assert dev.running_sha() == v1["sha256"] and st["current"]["sha256"] == v1["sha256"]

    # A restart does not bring the crash (or the download) back.
    dev.stop()
    since = len(dev.lines)
    dev.start()
    wait_for(lambda: dev.saw("registered", since), 60, "the agent to start again")
    before = publisher.status("miss0")["heartbeat_at"]
    wait_for(lambda: publisher.status("miss0")["heartbeat_at"] > before, 60, "a heartbeat after the restart")
    assert dev.proc.poll() is None
    assert not dev.saw("downloading", since) and not dev.saw("applying", since)
    assert publisher.status("miss0")["applied_sequence"] == 2 and dev.running_sha() == v1["sha256"]
