"""Running the documentation's commands as a reader runs them: a block read with
``tests.docs_blocks.doc_block`` goes to ``bash -e`` (or ``python``) as it is written, in a folder of its own,
in a shell of the environment the tests run in (its ``bin/`` first on ``PATH``, so ``edgeslim``, ``mlflow``
and ``python`` are this environment's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import run_process


def shell_env(**extra: str) -> dict[str, str]:
    """The environment of a shell of this Python environment, plus ``extra``."""
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


def run_bash(block: str, *, cwd: Path, env: dict | None = None, timeout: float = 1800):
    """``block`` as a bash script that stops at the first failing command, as a reader's terminal would
    show it; returns the completed process."""
    return run_process(["bash", "-e", "-c", block], cwd=cwd, env={**shell_env(), **(env or {})}, timeout=timeout)


def run_python(block: str, *, cwd: Path, env: dict | None = None, timeout: float = 1800, prelude: str = ""):
    """``block`` as a Python script run from ``cwd`` (``prelude`` first: what the page says the reader already
    has, e.g. a trained ``model``)."""
    return run_process([sys.executable, "-c", prelude + block], cwd=cwd, env={**shell_env(), **(env or {})},
                       timeout=timeout)


@contextlib.contextmanager
def background(block: str, *, cwd: Path, ready_url: str, log: Path, env: dict | None = None,
               timeout: float = 900) -> Iterator[subprocess.Popen]:
    """``block``, which starts a server with ``&``, run in a shell that waits for it; yields once
    ``ready_url`` answers 200, and ends the shell's whole process group on exit. A server that does not
    answer fails the test with the tail of its log."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(["bash", "-c", block + "\nwait\n"], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **shell_env(), **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout  # only stops a hang: a server boots in seconds
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{block.splitlines()[0]} did not answer at {ready_url}\n--- {log} ---\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
