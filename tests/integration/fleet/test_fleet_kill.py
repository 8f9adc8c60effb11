"""SIGKILL the agent mid-download and mid-swap, at random points, again and again.

Each kill also kills the agent's health-check child (the whole process group,
as a power cut would). After every kill the device's ``current`` (and
``previous``) must be a whole, verified model that loads; after every restart
the agent must end on the newest model.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.fleet_it_helpers import make_onnx, release_is_complete, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"
MANIFESTS = 7  # x 3 kills each = 21


def _kill_after(dev, marker: str, delay: float, done_markers: tuple[str, ...], since: int,
                decided_since: int | None = None) -> bool:
    """Wait for ``marker`` in the log, sleep ``delay``, SIGKILL; True if no done-marker came first.

    ``decided_since``: where this manifest's log begins; when an earlier phase's kill came
    too late and the manifest is already decided, there is no marker left to wait for.
    """
    first = since if decided_since is None else decided_since
    wait_for(lambda: dev.saw(marker, since) or dev.proc.poll() is not None
             or any(dev.saw(m, first) for m in done_markers), 60, f"'{marker}' in the agent log")
    time.sleep(delay)
    hit = not any(dev.saw(m, since) for m in done_markers)
    dev.kill()
    return hit


def test_sigkill_mid_download_and_mid_swap_always_leaves_a_working_model(agents, publisher, tmp_path):
    rng = random.Random(20261123)
    # ~1 MB models, downloads capped at 2 MB/s: each download takes about half a second.
    dev = agents("k0", ORIN, extra=["--max-download-rate", "2000000"], start=False)
    known: set[str] = set()
    kills = {"download": 0, "swap": 0, "other": 0}
    for i in range(MANIFESTS):
        path = make_onnx(tmp_path / f"m{i}.onnx", seed=100 + i, n_in=512, n_out=512)
        art = publisher.upload(path)
        known.add(art["sha256"])
        publisher.publish("k0", publisher.manifest("k0", ORIN, i + 1, art, publisher.golden(path, n_in=512)))
        short = art["sha256"][:12]
        manifest_start = len(dev.lines)
        plan = [("download", f"{short} (", rng.uniform(0.05, 0.45)),
                ("swap", "swapping current", rng.uniform(0.0, 0.35)),
                ("swap", "swapping current", rng.uniform(0.0, 0.35))]
        for phase, marker, delay in plan:
            since = len(dev.lines)
            dev.start()
            if phase == "download":
                hit = _kill_after(dev, "download", delay, (f"verified {short}",), since)
            else:
                hit = _kill_after(dev, marker, delay, (f"committed sequence {i + 1}", "rolling back"), since,
                                  decided_since=manifest_start)
            kills[phase if hit else "other"] += 1
            # After a kill, whatever is on disk is whole and loads.
            release_is_complete(dev.state_dir, "current", known)
            release_is_complete(dev.state_dir, "previous", known)
        dev.start()  # a restart ends on the newest model
        wait_for(lambda: (publisher.status("k0").get("last") or {}).get("sequence") == i + 1, 60,
                 f"manifest {i + 1} decided after restart")
        assert publisher.status("k0")["last"]["result"] == "committed"
        assert release_is_complete(dev.state_dir, "current", known) == art["sha256"]
        assert not (dev.state_dir / "swap.json").exists()
        dev.stop()
    total = sum(kills.values())
    assert total >= 20, kills
    assert kills["download"] >= 5 and kills["swap"] >= 5, kills
    assert dev.saw("resuming download")
    assert dev.saw("undid a half-done swap")
    print("kills:", kills)
