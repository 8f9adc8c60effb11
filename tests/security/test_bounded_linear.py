"""The bounded-input guard costs time linear in its input, whatever the input holds.

An unclosed string of escaped quotes (``"\\"\\"\\"...``) made the guard's string scan start again at
every quote, so its cost grew with the square of the size: a 1 MB device status held a controller
for an hour, a 256 KB root document every agent for minutes. Each hostile shape below is scanned at
1x and at 16x the size, the same number of bytes in all (16 scans of 1x, one of 16x); the CPU time
per byte of the 16x scan must stay within 4x of the 1x scan's (a linear guard: about 1x; a
quadratic one: 16x). Then the repro through real processes: ``edgeslim fleet devices`` with such a
status answers and names the device in one line, and an agent that finds such a root document at
the next root version refuses it in one line and keeps serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from edgeslim.deploy import bounded
from edgeslim.deploy.store import FleetKeys, LocalStore

SHAPES = {
    "unclosed escaped quotes": lambda n: b'"' + b'\\"' * (n // 2),
    "unclosed after a string": lambda n: b'["x", "' + b'\\"' * (n // 2),
    "backslashes": lambda n: b'"' + b"\\" * n,
    "quotes": lambda n: b'"' * n,
    "brackets in a string": lambda n: b'"' + b"[{" * (n // 2),
    "flat brackets": lambda n: b"[]" * (n // 2),
    "many strings": lambda n: b"[" + b'"a\\"",' * (n // 6) + b'""]',
}
SMALL = 2 << 10


def _cpu_per_byte(data: bytes, times: int) -> float:
    best = float("inf")
    for _ in range(3):  # the least of three: other jobs on the machine only ever add time
        t = time.process_time()
        for _ in range(times):
            bounded.depth(data, bounded.MAX_DEPTH)
        best = min(best, time.process_time() - t)
    return max(best, 1e-9) / (len(data) * times)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_guard_is_linear_in_its_input(shape):
    make = SHAPES[shape]
    small, large = make(SMALL), make(16 * SMALL)
    # The same bytes in all, in scans long enough to measure (repeated until each side is ~512 KB).
    reps = max(1, (512 << 10) // len(large))
    per_byte_small = _cpu_per_byte(small, 16 * reps)
    per_byte_large = _cpu_per_byte(large, reps)
    assert per_byte_large < 4 * per_byte_small, (
        f"{shape}: a byte costs {per_byte_large / per_byte_small:.1f}x as much at 16x the size")


def test_hostile_strings_are_refused_as_not_json():
    with pytest.raises(bounded.BoundedInputError) as err:
        bounded.loads(b'"' + b'\\"' * 500_000, what="status of D", max_bytes=bounded.MAX_STATUS_BYTES)
    assert err.value.reason == "malformed" and "status of D is not JSON" in str(err.value)
    assert bounded.depth(b'{"a": ["]]]", {"b": "\\"[[[", "c": [[]]}]}') == 5  # brackets in strings do not count


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgeslim", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def fleet(tmp_path):
    """A local fleet "f" with one enrolled device ``d0`` that has registered (in-process agent)."""
    from edgeslim.deploy.agent.device import Agent, AgentSettings
    from tests.fleet_trust import TrustKit

    kit = TrustKit(tmp_path / "keys", fleet="f")
    store = LocalStore(tmp_path / "store")
    agent = Agent(store=store, fleet="f", device_id="d0", device_class="cls-a", state_dir=tmp_path / "d0",
                  root=kit.root, settings=AgentSettings(poll_interval=0.01))
    assert agent.step() == "none"
    kit.enrol(store, [agent])
    return kit, store, agent


def test_fleet_devices_answers_with_a_hostile_status(fleet, tmp_path):
    kit, store, _ = fleet
    store.put(FleetKeys("f").status("d0"), b'"' + b'\\"' * 500_000)  # 1 MB: an hour of CPU for a quadratic guard
    out = _cli("fleet", "devices", "f", "--store", str(store.root), "--root", str(kit.root_path))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if "d0" in line]
    assert len(lines) == 1 and "status ignored" in lines[0] and "not JSON" in lines[0], out.stderr
    assert any(line.split()[:2] == ["d0", "cls-a"] for line in out.stdout.splitlines()), out.stdout


def test_an_agent_refuses_a_hostile_root_document_in_one_line(fleet, tmp_path):
    kit, store, agent = fleet
    store.put(FleetKeys("f").root(2), b'"' + b'\\"' * 120_000)  # just under the cap of a root document
    assert len(b'"' + b'\\"' * 120_000) < bounded.MAX_SMALL_BYTES
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.deploy.agent.device", "--store", str(store.root), "--fleet", "f",
         "--device-id", "d0", "--device-class", "cls-a", "--state-dir", str(tmp_path / "d0"),
         "--root", str(kit.root_path), "--once"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "root" in line and "not JSON" in line]
    assert len(lines) == 1, proc.stderr
