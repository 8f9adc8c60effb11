"""Broken links between a real agent and RGW, through a loopback proxy."""

from __future__ import annotations

import re

import pytest

from tests.fleet_it_helpers import make_onnx, release_is_complete, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


def test_interrupted_download_resumes_instead_of_restarting(agents, publisher, proxy, tmp_path):
    path = make_onnx(tmp_path / "big.onnx", seed=21, n_in=512, n_out=512)
    art = publisher.upload(path)
    proxy.set("cut", cut_after=300_000)  # every connection dies after 300 kB
    dev = agents("n0", ORIN, endpoint=proxy.endpoint)
    publisher.publish("n0", publisher.manifest("n0", ORIN, 1, art, publisher.golden(path, n_in=512)))
    wait_for(lambda: dev.running_sha() == art["sha256"], 90, "the download to finish through the cuts")
    offsets = [int(m) for m in re.findall(r"resuming download of \w+ at byte (\d+)", "".join(dev.lines))]
    assert len(offsets) >= 2 and offsets == sorted(offsets) and offsets[0] > 0
    # Resumed, not restarted: well under two full copies went through the proxy.
    assert proxy.bytes_down < 1.6 * art["size"], (proxy.bytes_down, art["size"])
    assert release_is_complete(dev.state_dir, "current", {art["sha256"]}) == art["sha256"]


def test_store_outage_backs_off_keeps_serving_and_recovers(agents, publisher, proxy, tmp_path):
    p1, p2 = make_onnx(tmp_path / "v1.onnx", seed=22), make_onnx(tmp_path / "v2.onnx", seed=23)
    a1, a2 = publisher.upload(p1), publisher.upload(p2)
    dev = agents("n1", ORIN, endpoint=proxy.endpoint)
    publisher.publish("n1", publisher.manifest("n1", ORIN, 1, a1, publisher.golden(p1)))
    wait_for(lambda: dev.running_sha() == a1["sha256"], 60, "v1 installed")
    since = len(dev.lines)
    proxy.set("refuse")
    publisher.publish("n1", publisher.manifest("n1", ORIN, 2, a2, publisher.golden(p2)))  # written past the outage
    wait_for(lambda: sum("store unreachable" in line for line in dev.lines[since:]) >= 4, 30, "4 failed polls")
    delays = [float(m) for m in re.findall(r"retry \d+ in ([\d.]+)s", "".join(dev.lines[since:]))]
    assert max(delays) <= 1.0 and max(delays) > min(delays)  # backs off, capped by --max-backoff 1
    assert all("still serving releases/" in line for line in dev.lines[since:] if "store unreachable" in line)
    assert dev.running_sha() == a1["sha256"]
    assert release_is_complete(dev.state_dir, "current", {a1["sha256"]}) == a1["sha256"]
    assert dev.local_status()["state"] == "offline"
    proxy.set("pass")
    wait_for(lambda: dev.running_sha() == a2["sha256"], 60, "v2 installed once the store is back")
    wait_for(lambda: dev.saw("store reachable again", since), 30, "the agent to note the store is back")
