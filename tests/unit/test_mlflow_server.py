"""MlflowServer: a server that dies is one line naming the cause, with the log's end kept for tests."""

from __future__ import annotations

import pytest

from edgeslim.components.common.errors import TrackingUnavailable
from edgeslim.components.common.mlflow_server import MlflowServer


def test_a_server_that_dies_is_one_line_naming_the_error_and_keeps_the_log_tail(tmp_path):
    # A stand-in `mlflow` package first on the path: `python -m mlflow server` fails at once.
    fake = tmp_path / "fake" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import sys\nprint('starting')\nprint('ERROR: address already in use')\nprint('shutdown complete')\n"
        "sys.exit(3)\n")
    server = MlflowServer(tmp_path / "srv", timeout=30, log_path=tmp_path / "logs" / "server.log",
                          env={"PYTHONPATH": str(fake.parent)})
    with pytest.raises(TrackingUnavailable) as err:
        server.start()
    msg = str(err.value)
    assert "\n" not in msg and "exited with code 3" in msg and "ERROR: address already in use" in msg
    assert str(tmp_path / "logs" / "server.log") in msg
    assert "starting" in err.value.log_tail and "shutdown complete" in server.log_tail()
    assert server.proc is None  # stopped, log closed


def test_artifact_root_and_log_default_under_root_and_can_be_chosen(tmp_path):
    s = MlflowServer(tmp_path)
    assert s.artifacts == tmp_path.resolve() / "artifacts" and s.log_path == tmp_path.resolve() / "mlflow-server.log"
    s = MlflowServer(tmp_path, artifacts=tmp_path / "a", log_path=tmp_path / "l.log")
    assert s.artifacts == (tmp_path / "a").resolve() and s.log_path == (tmp_path / "l.log").resolve()
    assert s.uri == f"http://127.0.0.1:{s.port}"
