"""`edgeslim demo` end to end, as a user runs it: the demo's targets hold, and a second run finds its teacher."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_meets_its_targets_and_its_teacher_is_reused(tmp_path):
    wd = tmp_path / "demo"
    # The timeout only stops a hang: the demo takes about 90 s alone, several minutes on a busy machine.
    first = run_cli("demo", "--workdir", str(wd), timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher: training epoch" in first.stderr  # long steps show progress
    # ...including the pipeline's tasks, which run in the local runner's subprocesses
    assert "task pull-op: started" in first.stderr and "task report-op: success" in first.stderr
    assert "1:distill(logit): epoch 1/" in first.stderr  # from inside the transform task
    assert "mlflow ui --backend-store-uri" in first.stdout and "--artifacts-destination" in first.stdout
    last = first.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: gate passed in ") and last.endswith(" s")  # its wall time, last
    rep = json.loads((wd / "report.json").read_text())
    src, cand = rep["source"], rep["candidate"]
    assert src["name"] == "digits-teacher" and src["uri"] == "models:/digits-teacher@champion"
    assert src["metric"] > 95.0
    assert src["metric"] - cand["metric"] <= 1.0          # within 1.0 point of the teacher
    assert src["size_bytes"] / cand["size_bytes"] >= 3.5  # >= 3.5x smaller than the fp32 ONNX
    assert cand["quantization"]["zero_points_all_zero"] is True
    assert rep["gate"]["passed"] is True
    assert rep["registered"]["name"] == "digits-teacher-edge" and rep["registered"]["alias"] == "edge-candidate"
    assert (wd / "report.html").is_file() and (wd / "model.int8.onnx").is_file()
    assert "gate: PASSED" in first.stdout

    # A second `edgeslim demo` in the same folder finds the teacher the first one registered, in the
    # store it left, and does not train again. (That a re-run of a recipe reuses its registration is
    # tests/integration/test_spine_pipeline.py's.)
    from edgeslim.components.common.tracking import connect
    from edgeslim.pipelines.demo import ensure_teacher
    from tests.conftest import running_mlflow_server

    with running_mlflow_server(wd / "mlflow") as server:
        lines: list[str] = []
        version = ensure_teacher(connect(server.uri), progress=lines.append)
    assert version == "1" and lines == ["teacher: reusing digits-teacher version 1 @champion"]
