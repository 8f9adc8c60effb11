"""A real ``mlflow server`` on loopback (SQLite backend), for the demo and the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .errors import TrackingUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """Start ``mlflow server`` with a SQLite store and a local artifact directory.

    Use as a context manager; ``uri`` is its tracking URI.
    """

    def __init__(self, root: str | Path, port: int | None = None, timeout: float = 120.0):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.timeout = timeout
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "mlflow-server.log", "ab")
        env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TrackingUnavailable(
                    f"mlflow server exited with code {self.proc.returncode}; see {self.root / 'mlflow-server.log'}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TrackingUnavailable(f"mlflow server at {self.uri} did not start within {self.timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            import signal

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

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
