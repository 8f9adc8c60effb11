"""The steps a task's end-to-end test takes as a user and a device would: register a model whose code lives
outside the repository, write a quick recipe and ``edgeslim run`` it, then, with the edge model it registered,
check the registration, download the model, run Python on it in a fresh process, build the release's golden
check as the controller does, and run the device agent's health check against it."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.conftest import register_champion, run_cli, run_process


def register_user_model(tracking_uri: str, experiment: str, name: str, src: Path, module: str, code: str,
                        build: Callable[[Any], Any]) -> None:
    """``code`` written as the module ``module`` in ``src``; ``build(module)`` makes the model, which is logged
    pickled with the module as its ``code_paths`` (the pipeline gets the code only from there) and registered
    as ``name@champion``. The module is importable only while ``build`` runs."""
    path = src / f"{module}.py"
    path.write_text(code)
    sys.path.insert(0, str(src))
    try:
        model = build(importlib.import_module(module))
        register_champion(tracking_uri, model, name, experiment, code_paths=[str(path)])
    finally:
        sys.path.remove(str(src))
        sys.modules.pop(module, None)


def write_quick_recipe(doc: dict, out: Path, experiment: str) -> Path:
    """``doc`` written to ``out`` with a quick latency measurement (batch 1, a few repeats), registered in
    ``experiment``."""
    doc["evaluate"] = {"latency_warmup": 1, "latency_repeats": 3, "latency_batches": [1]}
    doc["register"] = {**doc["register"], "experiment": experiment}
    out.write_text(yaml.safe_dump(doc))
    return out


def run_recipe(recipe: Path, tracking_uri: str, wd: Path) -> tuple[Any, Path]:
    """``edgeslim run`` on ``recipe``: the process and its workdir (``wd / "out"``)."""
    proc = run_cli("run", str(recipe), "--tracking-uri", tracking_uri, "--workdir", str(wd / "out"))
    return proc, wd / "out"


def passed_report(run: tuple[Any, Path]) -> dict:
    """The report of a :func:`run_recipe` that exited 0 with its gate passed."""
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["gate"]["passed"] is True, rep["gate"]["summary"]
    return rep


def check_registered(tracking_uri: str, parent: str, report: dict) -> None:
    """``edgeslim run`` registered the edge model of ``parent`` as ``<parent>-edge@edge-candidate``, the version
    its report names, tagged with its parent."""
    from mlflow import MlflowClient

    mv = MlflowClient(tracking_uri).get_model_version_by_alias(f"{parent}-edge", "edge-candidate")
    assert mv.version == report["registered"]["version"] and mv.tags["edgeslim.parent_name"] == parent


def download_edge_model(parent: str, run, tracking_uri: str, dst: Path) -> Path:
    """The edge model of ``parent`` that ``run`` (``edgeslim run``'s process and workdir) registered, downloaded
    into ``dst``."""
    import mlflow

    assert run[0].returncode == 0, run[0].stderr[-3000:]
    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{parent}-edge@edge-candidate", dst_path=str(dst)))


def edge_task(release: Path) -> dict:
    """The task section of the edge model's metadata (``edge_meta.json``): what the device decodes by."""
    return json.loads((release / "edge_meta.json").read_text())["task"]


def python(code: str, env: dict | None = None):
    """``code`` (dedented) run by this Python in a process of its own."""
    return run_process([sys.executable, "-c", textwrap.dedent(code)], timeout=600, env=env)


def golden_check(release: Path, env: dict | None = None) -> dict:
    """The health check the controller builds for the release in ``release`` (its golden outputs)."""
    proc = python(f"""
        import json
        from pathlib import Path
        from edgeslim.deploy.golden import golden_check
        from edgeslim.deploy.rollout_config import WaveRolloutConfig
        print(json.dumps(golden_check(Path({str(release)!r}), WaveRolloutConfig())))
    """, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_health(release: Path, check: dict, env: dict | None = None) -> dict:
    """The device agent's health verdict (``ok``, ``error``) on the release in ``release`` against ``check``."""
    p = run_process([sys.executable, "-m", "edgeslim.deploy.agent.health"], timeout=600, env=env,
                    input=json.dumps({"release": str(release), "check": check}))
    return json.loads(p.stdout.strip().splitlines()[-1].split(" ", 1)[1])
