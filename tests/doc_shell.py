"""Run the documentation's ``<!-- run: NAME -->`` blocks as a reader's terminal would.

One working directory and one environment for a whole walk through the docs: what a block exports
is there for the next block (``export -p`` is saved after each block and sourced before the next),
and what a block starts in the background (``cmd &``) keeps running until :meth:`DocShell.close`,
which stops every process group the blocks made. Each block runs in ``bash -e`` (a failing command
fails the block, as a reader would notice), its output in files (a background process holding a
pipe cannot make the test wait). ``python``, ``mlflow``, ``edgeslim`` and ``edgeslim-agent`` are the
test's own interpreter and its packages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.docs_blocks import doc_block


# The commands the docs run, as modules of this Python (used where its bin folder lacks the script).
COMMANDS = {"mlflow": "mlflow", "edgeslim": "edgeslim", "edgeslim-agent": "edgeslim.deploy.agent.device"}


class DocShell:
    """``run(page, name)`` executes that block here; ``close()`` stops what the blocks left running.

    Args:
        cwd: the reader's working directory.
        env: the environment before the first block (the test's servers: MLflow, S3, the fleet).
    """

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = Path(cwd)
        self.cwd.mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent  # this Python's `python`, `edgeslim`, `mlflow` come first
        shims = self.cwd / ".doc-shell-bin"
        shims.mkdir(exist_ok=True)
        for command, module in COMMANDS.items():
            if not (bindir / command).exists():  # e.g. a venv over system site-packages has no `mlflow` script
                (shims / command).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
                (shims / command).chmod(0o755)
        self.env = dict(env, PATH=os.pathsep.join([str(shims), str(bindir),
                                                   env.get("PATH", os.environ.get("PATH", ""))]))
        self.state = self.cwd / ".doc-shell-env"
        self.state.write_text("")
        self.groups: list[int] = []
        self.times: dict[str, float] = {}

    def run(self, page: str, name: str, *, timeout: float = 900, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the block ``name`` of ``page`` (e.g. ``docs/fleet-rollout.md``); its stdout and stderr come
        back as text. ``env``: variables for this block only, over the shell's (not saved)."""
        text = doc_block(page, name)
        script = (f"set -e\nsource {self.state}\ncd {self.cwd}\n"
                  + "".join(f"export {k}={_quote(v)}\n" for k, v in (env or {}).items())
                  + text + f"\nexport -p > {self.state}.next\n")
        out, err = self.cwd / f".{name}.out", self.cwd / f".{name}.err"
        start = time.monotonic()
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.cwd, env=self.env, stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.groups.append(proc.pid)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._stop(proc.pid)
                raise AssertionError(f"{page} block {name!r} still running after {timeout:.0f} s (a hang)\n"
                                     f"--- stderr ---\n{err.read_text()[-3000:]}") from None
        self.times[name] = time.monotonic() - start
        done = subprocess.CompletedProcess(["bash", "-c", text], code, out.read_text(), err.read_text())
        if code == 0:
            nxt = Path(f"{self.state}.next")
            saved = [ln for ln in nxt.read_text().splitlines()
                     if not ln.startswith(("declare -x PWD=", "declare -x OLDPWD", "declare -x SHLVL="))]
            self.state.write_text("\n".join(saved) + "\n")
        if check and code != 0:
            raise AssertionError(f"{page} block {name!r} exited {code}:\n{text}\n--- stdout ---\n"
                                 f"{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}")
        return done

    def exported(self, name: str) -> str | None:
        """The value of a variable the blocks exported so far."""
        out = subprocess.run(["bash", "-c", f"source {self.state}; printf %s \"${{{name}-}}\""], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return out.stdout or None

    def _stop(self, pgid: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.1)

    def close(self) -> None:
        """Stop every process the blocks started, background ones included."""
        for pgid in reversed(self.groups):
            self._stop(pgid)
        self.groups.clear()


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
