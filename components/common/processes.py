"""Stop every process edgeslim started, however the command ends.

`edgeslim demo` starts an ``mlflow server`` (in its own session, with its workers) and the
local runner starts one subprocess per task. A SIGTERM (``timeout``, a cancelled CI job)
kills Python without unwinding, so ``with MlflowServer(...)`` never stops the server, and
the children are left orphaned, holding the port and memory. :func:`handle_termination`
turns SIGTERM (and SIGHUP) into an exception that unwinds the ``with`` blocks like Ctrl-C
does; :func:`stop_descendants` then ends whatever is still running below this process.

SIGKILL cannot be handled: a :class:`Lifeline` covers it. Its watchdog (``lifeline.py``) ends
every process started under it once its owner is gone, however it went.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Mapping

from edgeslim.components.common import lifeline as _watchdog


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
        alive = [p for p in alive if _watchdog.alive(p)]
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


def _reap(pids: list[int]) -> None:
    for pid in pids:  # only ours: waitpid(-1) would steal the exit status of a caller's children
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``).

    For a short-lived worker that starts nothing of its own (the device agent's health check):
    cheaper than a :class:`Lifeline`, and it needs no watchdog. Returns False where the kernel
    offers no such call; the worker then ends when its work does.
    """
    import ctypes
    import ctypes.util

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the call took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


class Lifeline:
    """A watchdog process that ends what was started under it when this process dies or closes it.

    Every process started with :meth:`env` (or, after :meth:`hold_environ`, every process started
    at all) carries the lifeline's token in its environment, and so do its own descendants,
    whatever session or process group they move to. When this process dies, even by SIGKILL, or
    calls :meth:`close`, the watchdog sends SIGTERM to every carrier, then SIGKILL after
    ``grace_s``. Lifelines nest: a process may carry the tokens of several.
    """

    def __init__(self, grace_s: float = 5.0) -> None:
        self.token = uuid.uuid4().hex[:16]
        self.grace_s = grace_s
        self._write_fd: int | None = None
        self._proc: subprocess.Popen | None = None
        self._held = False

    def start(self) -> "Lifeline":
        read_fd, self._write_fd = os.pipe()  # both ends non-inheritable: only the watchdog gets read_fd
        env = {k: v for k, v in os.environ.items() if k != _watchdog.ENV}  # no lifeline ends the watchdog
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _watchdog.__file__, str(read_fd), str(os.getpid()), self.token,
                 str(self.grace_s)],
                pass_fds=(read_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        finally:
            os.close(read_fd)
        return self

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with this lifeline's token added."""
        out = dict(os.environ if base is None else base)
        tokens = [t for t in out.get(_watchdog.ENV, "").split(",") if t]
        out[_watchdog.ENV] = ",".join([*tokens, self.token])
        return out

    def hold_environ(self) -> "Lifeline":
        """Put the token in ``os.environ``: every process started from now on carries it."""
        os.environ[_watchdog.ENV] = self.env()[_watchdog.ENV]
        self._held = True
        return self

    def carriers(self) -> list[int]:
        """Processes alive now that carry this lifeline's token."""
        return _watchdog.carriers(self.token)

    def close(self, *, wait: bool = True) -> None:
        """End every carrier now (the watchdog's sweep) and take the token out of ``os.environ``.

        ``wait``: return once the sweep is done; otherwise leave the watchdog to it.
        """
        if self._held:
            tokens = [t for t in os.environ.get(_watchdog.ENV, "").split(",") if t and t != self.token]
            if tokens:
                os.environ[_watchdog.ENV] = ",".join(tokens)
            else:
                os.environ.pop(_watchdog.ENV, None)
            self._held = False
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        if self._proc is not None:
            if wait:
                try:
                    self._proc.wait(timeout=4 * (self.grace_s + 1.0) + 30)
                except subprocess.TimeoutExpired:
                    pass
            self._proc = None

    def __enter__(self) -> "Lifeline":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
