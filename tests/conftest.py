"""Shared fixtures: a real `mlflow server` (SQLite) on loopback, digits data, tiny models."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# One compute thread per test process, and in everything a test starts (torch and NumPy read this at
# import): the suite runs two test processes on two cores, and threads beyond the cores spin against
# each other. Results then also do not depend on the machine's core count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("EDGESLIM_ORT_THREADS", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
REPO = Path(__file__).resolve().parents[1]
# RGW, the webhook-delivering MLflow server, agent processes: shared by tests/integration/fleet and
# tests/security, so the session's one RGW serves both.
pytest_plugins = ["tests.fleet_fixtures"]


_LIFELINE = None


def pytest_configure(config):
    # Every process a test starts (servers, RGW's daemons, agents, CLI runs) carries this test
    # process's lifeline: if pytest dies, even by SIGKILL, its watchdog ends them all.
    global _LIFELINE
    from edgeslim.components.common.processes import Lifeline

    _LIFELINE = Lifeline().start().hold_environ()
    # Seeded runs repeat bit for bit on one machine: deterministic kernels wherever torch has a
    # choice (docs/design.md, "What repeats bit for bit").
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)


def pytest_unconfigure(config):
    if _LIFELINE is not None:
        _LIFELINE.close()


@pytest.fixture(autouse=True)
def _fresh_mlflow_globals():
    """Tests talk to different MLflow servers: no active run, experiment id or tracking URI leaks between
    them. (A test's ``mlflow.set_tracking_uri`` also rewrites ``$MLFLOW_TRACKING_URI``: left in place,
    a later test in the same process talks to a server a module fixture has stopped.)"""
    import sys as _sys

    tracking = _sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = _sys.modules.get("mlflow.tracking._model_registry.utils")
    saved_uris = (tracking._tracking_uri if tracking else None, registry._registry_uri if registry else None)
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    fluent = _sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        import mlflow

        while mlflow.active_run():
            mlflow.end_run()
        fluent._active_experiment_id = None
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        os.environ.pop(var, None)
    tracking = _sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = _sys.modules.get("mlflow.tracking._model_registry.utils")
    if tracking is not None:
        tracking._tracking_uri = saved_uris[0]
    if registry is not None:
        registry._registry_uri = saved_uris[1]
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def digits():
    from edgeslim.plugins.datasets import SklearnDigits

    return SklearnDigits(seed=0).load()


@pytest.fixture(scope="session")
def tiny_teacher(digits):
    """A small DigitsCNN trained for a few epochs: accurate enough (>90%) to gate on."""
    import torch

    from edgeslim.components.reference.digits import DigitsCNN, train_classifier

    torch.manual_seed(0)
    return train_classifier(DigitsCNN(width=8), digits.x_train, digits.y_train, epochs=8, seed=0)


@contextlib.contextmanager
def running_mlflow_server(root: Path, *, while_booting: Callable[[], object] | None = None, **kwargs):
    """The tests' one way to run a real `mlflow server`: ``MlflowServer(root, **kwargs)``, stopped on exit.

    ``while_booting`` runs after the process is launched and before waiting for it to
    answer (other slow set-up overlaps with the server's ~15 s boot). A server that dies or
    does not answer fails the test with the tail of its log.
    """
    from edgeslim.components.common.errors import TrackingUnavailable
    from edgeslim.components.common.mlflow_server import MlflowServer

    # The boot timeout only stops a hang: about 5 s alone, a minute or more beside CPU-bound jobs.
    kwargs.setdefault("timeout", 900)
    server = MlflowServer(root, **kwargs).launch()
    try:
        if while_booting is not None:
            while_booting()
        try:
            server.wait_ready()
        except TrackingUnavailable as exc:
            pytest.fail(f"{exc}\n--- end of {server.log_path} ---\n{server.log_tail()}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process with a SQLite backend, started once per session."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def register_champion(tracking_uri: str, model, name: str, experiment: str, *,
                      code_paths: list[str] | None = None) -> str:
    """``model`` logged pickled in a run of ``experiment`` (with ``code_paths`` where its code lives outside
    the repository), registered as ``name`` and its new version made ``@champion``, as a team's training job
    leaves a model for edgeslim; returns ``models:/name@champion``."""
    import mlflow

    from edgeslim.components.common.tracking import connect

    client = connect(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", code_paths=code_paths,
                                        registered_model_name=name)
    client.set_registered_model_alias(name, "champion", info.registered_model_version)
    return f"models:/{name}@champion"


@pytest.fixture(scope="session")
def registered_teacher(mlflow_server, tiny_teacher, digits):
    """The tiny teacher registered as `tiny-teacher@champion`; returns the URI."""
    return register_champion(mlflow_server.uri, tiny_teacher, "tiny-teacher", "tests-reference")


def run_process(cmd: list[str], *, timeout: float, env: dict | None = None, cwd: Path | None = None,
                input: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a process group of its own.

    ``timeout`` only stops a hang: on expiry the whole group is SIGKILLed (not only ``cmd``,
    whose children would otherwise keep running and holding ports), and the test fails with
    the output so far.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} still running after {timeout:.0f} s (a hang: killed its process "
                    f"group)\n--- stderr ---\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 1800):
    """Run `python -m edgeslim ARGS` in a subprocess, as a user would (see :func:`run_process`)."""
    return run_process([sys.executable, "-m", "edgeslim", *args], timeout=timeout, env=env, cwd=cwd)
