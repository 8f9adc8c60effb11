"""`edgeslim demo` end to end, as the README and docs/quickstart.md document it: the demo's targets hold, and
a second run finds its teacher.

The README's demo command is the quickstart's install followed by the quickstart's `edgeslim demo`. The
install is what the test environment was made with (the test command's `-e '.[test]'` holds every
`pipeline` requirement; tests/integration/fleet/test_agent_install.py checks that), so the test runs the
documented `edgeslim demo` as written, in a fresh folder.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.doc_commands import run_bash
from tests.docs_blocks import REPO, blocks, doc_block

pytestmark = pytest.mark.slow
INSTALL = "pip install torch==2.13.0 -e '.[pipeline]'"


def test_the_readme_demo_is_the_quickstarts_install_and_demo():
    demo = doc_block("docs/quickstart.md", "demo")
    assert doc_block("README.md", "demo") == f"{INSTALL} && {demo}"
    assert [b.text for b in blocks(REPO / "docs" / "quickstart.md") if b.text.startswith("pip install")] == \
        [INSTALL + "\n"]


def epoch_counts() -> dict[str, int]:
    """Each training of the demo (the teacher, then the recipe's torch stages) and its epochs."""
    from edgeslim.components.recipe import load_recipe
    from edgeslim.pipelines.demo import DEMO_RECIPE, EPOCHS

    counts = {"teacher": EPOCHS}
    for i, stage in enumerate(load_recipe(DEMO_RECIPE).torch_stages):
        counts[f"{i + 1}:{stage.stage}({stage.method})"] = \
            stage.epochs if stage.stage == "distill" else stage.finetune_epochs * stage.steps
    return counts


def test_demo_meets_its_targets_and_its_teacher_is_reused(tmp_path):
    wd = tmp_path / "edgeslim-demo"  # the demo's default --workdir, in the reader's folder
    # The timeout only stops a hang: the demo takes about 90 s alone, several minutes on a busy machine.
    first = run_bash(doc_block("docs/quickstart.md", "demo"), cwd=tmp_path, timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]
    # Never silent for long: every epoch of every training has its line, counted right, including those
    # inside the pipeline's tasks (the local runner's subprocesses), whose starts and ends show too.
    for label, epochs in epoch_counts().items():
        for e in range(1, epochs + 1):
            line = f"teacher: training epoch {e}/{epochs} (" if label == "teacher" else f"{label}: epoch {e}/{epochs},"
            assert line in first.stderr, (line, first.stderr[-3000:])
    qat = re.findall(r"quantize qat: epoch (\d+)/(\d+)", first.stderr)  # when the search reaches QAT
    assert [int(e) for e, _ in qat] == list(range(1, len(qat) + 1)) and {n for _, n in qat} <= {str(len(qat))}
    assert "training the reference model while MLflow starts" in first.stderr
    assert "task pull-op: started" in first.stderr and "task report-op: success" in first.stderr
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
