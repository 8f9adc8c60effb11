"""A stopped `edgeslim demo` leaves nothing running: not its mlflow server, not a task subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _sessions(sids: set[int]) -> list[int]:
    """Live processes in these sessions (the demo's own, and the one its mlflow server leads)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) in sids:  # state, ppid, pgrp, session
                out.append(int(proc.name))
    return out


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(proc.name), cmd[:200]))
    return found


@pytest.mark.parametrize("sig,when", [
    (signal.SIGKILL, "task"),                 # a task runs in the local runner's subprocess, the server is up
    (signal.SIGTERM, "MLflow at http"),       # the server is up, nothing else yet
    (signal.SIGINT, "teacher: training"),     # the server is booting while the teacher trains
])
def test_a_signal_mid_run_stops_every_process_the_demo_started(tmp_path, sig, when):
    """SIGKILL (nothing can be cleaned up: the lifeline's watchdog does it), SIGTERM and Ctrl-C."""
    wd = tmp_path / f"demo-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-m", "edgeslim", "demo", "--workdir", str(wd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if (when == "task" and "task " in line and "started" in line) or (when != "task" and when in line):
                seen.set()
        seen.set()  # the demo ended on its own: the assertions below say so

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        seen.wait(3600)  # stops a hang only
        assert proc.poll() is None, "the demo ended before the signal:\n" + "".join(lines[-30:])
        # The task's (or the server's) processes are up once they show in /proc with the workdir.
        deadline = time.monotonic() + 600
        while len(_processes_mentioning(str(wd))) < (2 if when == "task" else 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        running = _processes_mentioning(str(wd))
        assert running, "the demo's server and tasks should be running now"
        sids = {proc.pid} | {os.getsid(pid) for pid, _ in running}
        os.kill(proc.pid, sig)  # as `timeout`, a cancelled CI job or the OOM killer sends it: to edgeslim only
        code = proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + sig, "".join(lines[-20:])
        assert any(("stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted") in line for line in lines)
    # The watchdog's grace for SIGTERM is 5 s; the deadline only stops a hang.
    deadline = time.monotonic() + 300
    while (_sessions(sids) or _processes_mentioning(str(wd))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(wd)) == [] and _sessions(sids) == []
    ports = [int(line.rsplit(":", 1)[1].split("/")[0]) for line in lines if "MLflow at http" in line]
    for port in ports:  # nothing listens on the server's port any more (TIME_WAIT may linger)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
