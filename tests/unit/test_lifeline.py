"""The lifeline: what a process started ends when that process dies, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from edgeslim.components.common import lifeline as watchdog
from edgeslim.components.common.processes import Lifeline

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the lifeline reads /proc (Linux)")

OWNER = r"""
import subprocess, sys, time
from edgeslim.components.common.processes import Lifeline
Lifeline(grace_s=float(sys.argv[1])).start().hold_environ()
# One child in a session of its own (as mlflow server's workers), one that ignores SIGTERM with a
# child of its own: neither a group kill nor a tree walk after the owner's death reaches them.
a = subprocess.Popen(["sleep", "1000"], start_new_session=True)
b = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 1000 & wait"], start_new_session=True)
print(a.pid, b.pid, flush=True)
time.sleep(1000)
"""


def _wait_gone(pids: list[int], hang_s: float = 120.0) -> list[int]:
    deadline = time.monotonic() + hang_s  # stops a hang only: the sweep takes the grace period
    while any(watchdog.alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if watchdog.alive(p)]


def _children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def test_a_sigkilled_owner_takes_every_process_it_started_with_it():
    owner = subprocess.Popen([sys.executable, "-c", OWNER, "1.0"], stdout=subprocess.PIPE, text=True)
    started: list[int] = []
    try:
        a, b = map(int, owner.stdout.readline().split())
        started = [a, b, *_children_of(b)]
        assert all(watchdog.alive(p) for p in started)
        owner.kill()  # SIGKILL: no handler, no finally, no atexit
        owner.wait()
        assert _wait_gone(started) == [], "still running after the owner's death"
    finally:
        for p in started:
            if watchdog.alive(p):
                os.kill(p, signal.SIGKILL)


def test_close_ends_the_carriers_and_leaves_other_processes_alone():
    outer, inner = Lifeline(grace_s=0.5).start(), Lifeline(grace_s=0.5).start()
    procs = []
    try:
        both = subprocess.Popen(["sleep", "1000"], env=inner.env(outer.env()))
        only_outer = subprocess.Popen(["sleep", "1000"], env=outer.env())
        stranger = subprocess.Popen(["sleep", "1000"])
        procs = [both, only_outer, stranger]
        assert set(outer.carriers()) == {both.pid, only_outer.pid} and inner.carriers() == [both.pid]
        inner.close()
        both.wait(60)
        assert only_outer.poll() is None and stranger.poll() is None
        outer.close()
        only_outer.wait(60)
        assert stranger.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_hold_environ_marks_later_children_and_close_takes_the_mark_back():
    before = os.environ.get(watchdog.ENV)
    line = Lifeline().start().hold_environ()
    try:
        assert line.token in os.environ[watchdog.ENV].split(",")
        child = subprocess.run([sys.executable, "-c", f"import os; print(os.environ['{watchdog.ENV}'])"],
                               capture_output=True, text=True, check=True)
        assert line.token in child.stdout.strip().split(",")
    finally:
        line.close()
    assert os.environ.get(watchdog.ENV) == before


MIDDLE = r"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
print(child.pid, flush=True)
print(child.stdout.readline().strip(), flush=True)  # the child is set up
child.wait()
"""
WORKER = r"""
import time
from edgeslim.components.common.processes import die_with_parent
print("armed" if die_with_parent() else "unsupported", flush=True)
time.sleep(1000)
"""


def test_a_worker_that_asked_to_die_with_its_parent_does():
    """The device agent's health check: its agent SIGKILLed mid-check takes the check with it."""
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, WORKER], stdout=subprocess.PIPE, text=True)
    worker = int(middle.stdout.readline())
    try:
        assert middle.stdout.readline().strip() == "armed"
        middle.kill()
        middle.wait()
        assert _wait_gone([worker]) == []
    finally:
        if watchdog.alive(worker):
            os.kill(worker, signal.SIGKILL)
