"""A real ``mlflow server`` on loopback (SQLite backend), for the demo and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping

from edgeslim.components.common.errors import TrackingUnavailable
from edgeslim.components.common.processes import Lifeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """Start ``mlflow server`` with a SQLite store and a local artifact directory.

    Use as a context manager, or ``start()`` / ``stop()``; ``uri`` is its tracking URI.
    ``launch()`` and ``wait_ready()`` split ``start()`` so a caller can do other work
    while the server boots.

    Args:
        root: folder for ``mlflow.db``, the server log and (by default) the artifacts.
        port: loopback port; a free one when not given.
        timeout: seconds ``wait_ready`` waits for ``/health``.
        artifacts: the artifact root (``--artifacts-destination``); ``root/artifacts`` by default.
        log_path: where the server's stdout and stderr go (appended); ``root/mlflow-server.log`` by default.
        env: extra environment variables for the server process, over ``os.environ``.

    The server runs without MLflow's job-execution workers (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``
    is false unless ``env`` sets it): edgeslim submits no server-side jobs, and the workers (a job
    runner and its huey consumers, in sessions of their own) cost seconds of start-up and memory.
    Webhook deliveries do not need them. The server and everything it starts are on a
    :class:`Lifeline`: they end when ``stop()`` runs or the process that launched them dies.
    """

    def __init__(self, root: str | Path, port: int | None = None, timeout: float = 300.0, *,
                 artifacts: str | Path | None = None, log_path: str | Path | None = None,
                 env: Mapping[str, str] | None = None):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.timeout = timeout
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = Path(artifacts).resolve() if artifacts else self.root / "artifacts"
        self.log_path = Path(log_path).resolve() if log_path else self.root / "mlflow-server.log"
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._lifeline: Lifeline | None = None

    def launch(self) -> "MlflowServer":
        """Start the process without waiting for it to answer."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._lifeline = Lifeline().start()
        env = self._lifeline.env({**os.environ, "GIT_PYTHON_REFRESH": "quiet",
                                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        return self

    def wait_ready(self) -> "MlflowServer":
        """Wait until ``/health`` answers 200.

        Raises:
            TrackingUnavailable: the process exited, or did not answer within ``timeout``
                (then it is stopped). The message is one line; ``log_tail`` holds the log's end.
        """
        if self.proc is None:
            raise RuntimeError("MlflowServer.wait_ready() before launch()")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise self._failure(f"mlflow server exited with code {code}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise self._failure(f"mlflow server at {self.uri} did not start within {self.timeout:.0f} s")

    def start(self) -> "MlflowServer":
        """``launch()`` then ``wait_ready()``."""
        return self.launch().wait_ready()

    def log_tail(self, chars: int = 2000) -> str:
        """The last ``chars`` characters of the server log ("" when there is none)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-chars:].decode("utf-8", "replace")

    def _failure(self, what: str) -> TrackingUnavailable:
        tail = self.log_tail()
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        # The last error names the cause (a port in use, a bad store URI), not the shutdown lines after it.
        last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
        exc = TrackingUnavailable(f"{what}; see {self.log_path}" + (f" ({last[:300]})" if last else ""))
        exc.log_tail = tail
        return exc

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self.proc = None
        if self._lifeline is not None:  # workers that left the server's process group
            self._lifeline.close()
            self._lifeline = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
