"""A watchdog that ends every process started under a lifeline when its owner dies, even by SIGKILL.

Why a token in the environment: a SIGKILLed process cannot clean up, and what it started is
re-parented to init, out of reach of a process-tree walk. Servers also leave their process group
(``mlflow server`` starts its workers and job consumers in sessions of their own), so a group kill
misses them too. The environment is what every descendant inherits, whatever session or group it
moves to: each process started under the lifeline carries ``EDGESLIM_LIFELINE`` with the
lifeline's token, and ``/proc/PID/environ`` shows it for as long as the process lives.

The watchdog is this file run as a script (standard library only, ``python -I -S``, so it starts
in a few milliseconds and needs no installed package). It runs in its own session, so a kill of
its owner's process group does not reach it. It holds the read end of a pipe whose write end only
the owner holds: end of file means the owner died or closed the lifeline. It also watches its
parent id, for an owner whose descendants inherited the pipe by forking. Then it sends SIGTERM to
every process that carries the token, waits up to the grace period, and sends SIGKILL to the rest.

Linux only (``/proc``): elsewhere the watchdog has nothing to read and ends without a sweep.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

ENV = "EDGESLIM_LIFELINE"


def carriers(token: str) -> list[int]:
    """Live processes (not this one) whose environment carries ``token`` in ``EDGESLIM_LIFELINE``."""
    key = ENV.encode() + b"="
    want = token.encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:  # gone, or not ours to read
            continue
        for var in environ.split(b"\0"):
            if var.startswith(key) and want in var[len(key):].split(b","):
                found.append(int(name))
                break
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def sweep(token: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every carrier of ``token``, SIGKILL those still alive after ``grace_s``.

    Repeats while carriers remain (a server may start a worker while it is being stopped), at
    most four rounds. Returns every pid it signalled.
    """
    signalled: list[int] = []
    for _ in range(4):
        pids = carriers(token)
        if not pids:
            break
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        signalled += [p for p in pids if p not in signalled]
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        for pid in pids:
            if alive(pid):
                _kill(pid, signal.SIGKILL)
    return signalled


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def watch(fd: int, parent: int) -> None:
    """Return when ``fd`` reads end of file or this process's parent is no longer ``parent``."""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                if not os.read(fd, 4096):
                    return
            except OSError:
                return
        elif os.getppid() != parent:
            return


def main(argv: list[str]) -> int:
    fd, parent, token, grace_s = int(argv[1]), int(argv[2]), argv[3], float(argv[4])
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only the owner's end ends the watch
    watch(fd, parent)
    sweep(token, grace_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
