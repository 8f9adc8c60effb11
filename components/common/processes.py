"""Stop every process edgeslim started, however the command ends.

`edgeslim demo` starts an ``mlflow server`` (in its own session, with its workers) and the
local runner starts one subprocess per task. A SIGTERM (``timeout``, a cancelled CI job)
kills Python without unwinding, so ``with MlflowServer(...)`` never stops the server, and
the children are left orphaned, holding the port and memory. :func:`handle_termination`
turns SIGTERM (and SIGHUP) into an exception that unwinds the ``with`` blocks like Ctrl-C
does; :func:`stop_descendants` then ends whatever is still running below this process.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwind as for Ctrl-C (cleanup runs), then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, _frame) -> None:
    raise Terminated(signum)


def handle_termination() -> dict[int, object]:
    """From now on SIGTERM and SIGHUP unwind the stack (``finally`` and ``__exit__`` run).

    Returns the handlers it replaced, for :func:`restore` (a no-op off the main thread).
    """
    previous: dict[int, object] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise)
        except ValueError:  # not the main thread: signals stay as they are
            pass
    return previous


def restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below ``pid`` (this one by default), children first (Linux /proc)."""
    pid = os.getpid() if pid is None else pid
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def stop_descendants(grace_s: float = 5.0, *, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """SIGTERM every descendant but ``keep`` (and its process group when it leads one), then SIGKILL
    stragglers. ``keep``: what was already running before the command (a caller's own servers)."""
    pids = [p for p in descendants() if p not in keep]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        _reap(alive)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    _reap(alive)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:  # a session or group leader (mlflow server): its workers too
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reap(pids: list[int]) -> None:
    for pid in pids:  # only ours: waitpid(-1) would steal the exit status of a caller's children
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
