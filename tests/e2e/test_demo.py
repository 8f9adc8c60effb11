"""`edgeslim demo` end to end, as a user runs it: the demo's targets hold, a second run reuses."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_meets_its_targets_and_reuses_on_the_second_run(tmp_path):
    wd = tmp_path / "demo"
    first = run_cli("demo", "--workdir", str(wd), timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher: training epoch" in first.stderr  # long steps show progress
    # ...including the pipeline's tasks, which run in the local runner's subprocesses
    assert "task pull-op: started" in first.stderr and "task report-op: success" in first.stderr
    assert "1:distill(logit): epoch 1/" in first.stderr  # from inside the transform task
    assert "mlflow ui --backend-store-uri" in first.stdout and "--artifacts-destination" in first.stdout
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

    second = run_cli("demo", "--workdir", str(wd), timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher: reusing digits-teacher version 1" in second.stderr
    assert "training epoch" not in second.stderr
    rep2 = json.loads((wd / "report.json").read_text())
    assert rep2["registered"]["version"] == rep["registered"]["version"] and rep2["registered"]["reused"] is True
