"""Finding 6: losing ``agent.json`` reset the sequence floor to 0, so an old manifest was accepted again.

The floor is kept three times: agent.json, ``sequence-floor`` (written and fsynced before agent.json
on every decision) and the sequence each release's release.json records as having installed it.
On start the floor is the highest of them, with a warning when agent.json was lost.
"""

from __future__ import annotations

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_replay_after_losing_agent_json_is_still_refused(agents, publisher, tmp_path):
    dev = agents("lost0", ORIN)
    v1, v2 = (publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=90 + i)) for i in (1, 2))
    first = publisher.manifest("lost0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx"))
    publisher.publish("lost0", first)
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")
    publisher.publish("lost0", publisher.manifest("lost0", ORIN, 2, v2, publisher.golden(tmp_path / "v2.onnx")))
    wait_for(lambda: dev.running_sha() == v2["sha256"]
             and (publisher.status("lost0").get("last") or {}).get("sequence") == 2, 60, "v2 installed")

    dev.stop()
    (dev.state_dir / "agent.json").unlink()
    since = len(dev.lines)
    dev.start()
    wait_for(lambda: dev.saw("recovered the sequence floor 2", since), 60, "the floor recovered on start")

    etag = publisher.publish("lost0", first)  # replay the older, validly signed manifest
    st = wait_for(lambda: (publisher.status("lost0").get("rejected") or {}).get("etag") == etag
                  and publisher.status("lost0"), 60, "the agent to refuse the replay")
    assert st["rejected"]["reason"] == "replay", st["rejected"]
    assert st["applied_sequence"] == 2 and dev.running_sha() == v2["sha256"]
    assert dev.proc.poll() is None
