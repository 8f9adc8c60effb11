"""Finding 6 (clock): a device whose clock is a year behind, against expired manifests and frozen metadata.

``faketime`` is not installed on the test machines, and a subprocess's clock cannot be patched
from here, so the device is an in-process :class:`~edgeslim.deploy.agent.device.Agent` (the
same class the agent process runs) whose wall clock (``agent.ctx.clock``, which every part of
the agent reads) is a year behind (its ``time.monotonic`` and ``time.sleep`` are the real ones).
boto3 keeps the real clock: RGW refuses SigV4 requests signed more than 15 minutes off, and what
is under test is the agent's own expiry and freshness checks, not the S3 client. The store is
the real RGW, the health check the real child process, the timestamps the controller's own
(``Controller.publish_timestamp``).

- Once it has seen the fleet's signed timestamp, the device refuses a manifest that expired
  before it, reports ``metadata.clock_behind_s`` (about a year) in its signed status, and keeps
  its gated model; a fresh manifest still installs.
- Frozen metadata: once the timestamp itself has expired (a freeze attacker withholds new ones),
  the device reports ``metadata.stale`` and refuses a manifest that expired after the timestamp
  was issued.
"""

from __future__ import annotations

import time

import pytest

from edgeslim.deploy.agent.device import Agent, AgentSettings
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
YEAR = 365 * 24 * 3600.0
_real_time = time.time


def _year_behind() -> float:
    """The wall clock of a device a year behind."""
    return _real_time() - YEAR


@pytest.fixture
def behind(s3_store, keys, tmp_path, publisher):
    """An enrolled in-process device a year behind, running the gated v1; yields (agent, v2 artifact, v2 check)."""
    agent = Agent(store=s3_store, fleet="lab", device_id="t0", device_class=ORIN, state_dir=tmp_path / "t0",
                  root=keys.root, settings=AgentSettings(poll_interval=0.05, health_timeout=120))
    agent.ctx.clock = _year_behind
    agent.recover()
    assert agent.step() == "none"
    assert agent.now() < _real_time() - YEAR + 600  # it really is a year behind
    keys.enrol(s3_store, [agent])
    paths = [make_onnx(tmp_path / f"v{i}.onnx", seed=110 + i) for i in (1, 2)]
    (a1, a2), (g1, g2) = [publisher.upload(p) for p in paths], [publisher.golden(p) for p in paths]
    publisher.publish("t0", publisher.manifest("t0", ORIN, 1, a1, g1))
    assert agent.step() == "applied"
    assert agent.state["last"]["sha256"] == a1["sha256"]
    agent.a1 = a1
    return agent, a2, g2


def _signed_status(publisher):
    st = publisher.status("t0")
    assert st, "no status published"
    return st


def test_device_a_year_behind_refuses_a_manifest_expired_before_the_signed_timestamp(behind, keys, s3_store,
                                                                                      publisher):
    agent, a2, g2 = behind
    ts = keys.controller(s3_store).publish_timestamp()
    agent.step()
    assert agent.now() >= ts["issued_at"]  # the clock never runs behind the signed timestamp
    etag = publisher.publish("t0", publisher.manifest("t0", ORIN, 2, a2, g2, expires_in=-3600))  # expired 1 h ago
    assert agent.step() == "rejected"
    st = _signed_status(publisher)
    assert st["rejected"]["etag"] == etag and st["rejected"]["reason"] == "expired", st["rejected"]
    assert st["current"]["sha256"] == agent.a1["sha256"] and st["applied_sequence"] == 1
    md = st["metadata"]
    assert md["timestamp_version"] == ts["version"] and md["stale"] is False
    assert md["clock_behind_s"] > YEAR - 3600, md
    # Not stuck: a fresh manifest still installs.
    publisher.publish("t0", publisher.manifest("t0", ORIN, 3, a2, g2))
    assert agent.step() == "applied"
    assert _signed_status(publisher)["current"]["sha256"] == a2["sha256"]


def test_device_a_year_behind_notices_a_frozen_timestamp(behind, keys, s3_store, publisher):
    agent, a2, g2 = behind
    ts = keys.controller(s3_store, timestamp_ttl_s=3).publish_timestamp()
    agent.step()
    assert agent.state["timestamp"]["version"] == ts["version"]
    wait_for(lambda: _real_time() > ts["expires_at"] + 2, 30, "the timestamp to expire")
    # The freeze: no newer timestamp. A manifest that expired after the timestamp was issued, before now.
    man = publisher.manifest("t0", ORIN, 2, a2, g2, expires_in=(ts["issued_at"] + 1.0) - _real_time())
    assert ts["issued_at"] < man["signed"]["expires_at"] < _real_time()
    etag = publisher.publish("t0", man)
    got = agent.step()
    agent.publish_status("idle")
    st = _signed_status(publisher)
    rejected = st.get("rejected") or {}
    seen = {"stale": st["metadata"]["stale"], "step": got, "refused": rejected.get("etag") == etag,
            "reason": rejected.get("reason"), "running": st["current"]["sha256"]}
    assert seen == {"stale": True, "step": "rejected", "refused": True, "reason": "expired",
                    "running": agent.a1["sha256"]}, (seen, st["last"])
