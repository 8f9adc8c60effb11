"""Finding 4: a full disk crash-looped the agent, kept the ``.part`` and left status at "downloading".

The full disk is real: the agent's state directory is a 256 KB tmpfs (``mount -t tmpfs -o size=256k``,
which needs root; the test skips without it), and the new model is 400 KB, so ``write(2)`` fails
with ENOSPC mid-download. The agent drops the ``.part``, records the sequence as ``failed`` with
"no space left on device: free N bytes ...", reports ``idle``, keeps serving the current model,
and installs the next manifest that fits.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"


@pytest.fixture
def tiny_disk(tmp_path):
    d = tmp_path / "devices" / "full0"
    d.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(d)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield d
    if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_disk_fails_the_download_cleanly_and_the_agent_keeps_serving(tiny_disk, agents, publisher, tmp_path):
    dev = agents("full0", ORIN, start=False)
    assert dev.state_dir == tiny_disk
    try:
        dev.start()
        v1 = publisher.upload(make_onnx(tmp_path / "v1.onnx", seed=70))
        big = publisher.upload(make_onnx(tmp_path / "big.onnx", seed=71, n_in=256, n_out=400))  # 400 KB
        v3 = publisher.upload(make_onnx(tmp_path / "v3.onnx", seed=72))
        publisher.publish("full0", publisher.manifest("full0", ORIN, 1, v1, publisher.golden(tmp_path / "v1.onnx")))
        wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")

        publisher.publish("full0", publisher.manifest("full0", ORIN, 2, big,
                                                      publisher.golden(tmp_path / "big.onnx", n_in=256)))
        st = wait_for(lambda: ((publisher.status("full0").get("last") or {}).get("sequence") == 2
                               and publisher.status("full0").get("state") == "idle" and publisher.status("full0")),
                      60, "the agent to report the full disk")
        assert st["last"]["result"] == "failed", st["last"]
        assert st["last"]["reason"].startswith("no space left on device: free "), st["last"]["reason"]
        assert dev.proc.poll() is None, "the agent died on a full disk"
        assert not list((tiny_disk / "partial").iterdir()), "the .part was kept"
        assert dev.running_sha() == v1["sha256"] and st["current"]["sha256"] == v1["sha256"]

        # The failed sequence is not retried in a loop, and the next manifest that fits installs.
        publisher.publish("full0", publisher.manifest("full0", ORIN, 3, v3, publisher.golden(tmp_path / "v3.onnx")))
        wait_for(lambda: dev.running_sha() == v3["sha256"], 60, "v3 installed after the failure")
        assert sum("no space left on device" in line for line in dev.lines) == 1
    finally:
        dev.stop()
