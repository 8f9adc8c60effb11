"""A classifier of the user's own, as docs/quickstart.md ("Your own classifier") and the README document it,
run as written: the page's `mlflow server` command, its `my_models.py` and `log_model.py`, then
`edgeslim init` + `edgeslim run`, and the registered edge model loaded as the page loads it.

Then the same model, whose class exists only as the code logged with it, goes through distill -> prune ->
quantize (auto, QAT allowed) in Kubeflow's local runner: every task is a fresh process where that module
exists only as the code that travels with the model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.doc_commands import background, run_bash, run_python
from tests.docs_blocks import doc_block

pytestmark = pytest.mark.slow

PAGE = "docs/quickstart.md"
MODULE = "my_models"


@pytest.fixture(scope="module")
def documented_server(tmp_path_factory):
    """The page's `mlflow server ... &` and `export MLFLOW_TRACKING_URI=...`, as written, in the reader's
    fresh folder; only its port is swapped for a free one (the suite runs beside other servers)."""
    from edgeslim.components.common.mlflow_server import free_port

    cwd = tmp_path_factory.mktemp("quickstart")
    block = doc_block(PAGE, "mlflow-server")
    assert "--port 5000" in block and "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in block
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with background(block.replace("5000", str(port)), cwd=cwd, ready_url=f"{uri}/health",
                    log=cwd.parent / "mlflow-server.log"):
        yield cwd, uri


@pytest.fixture(scope="module")
def documented_classifier(documented_server):
    """The page's my_models.py and log_model.py written as the reader saves them, then its three commands."""
    cwd, uri = documented_server
    (cwd / f"{MODULE}.py").write_text(doc_block(PAGE, "my-models"))
    (cwd / "log_model.py").write_text(doc_block(PAGE, "log-model"))
    # The timeout only stops a hang: training, registration and the pipeline take about a minute alone.
    proc = run_bash(doc_block(PAGE, "own-classifier"), cwd=cwd, env={"MLFLOW_TRACKING_URI": uri}, timeout=3600)
    return cwd, uri, proc


def test_the_documented_classifier_is_compressed_gated_and_registered(documented_classifier):
    cwd, uri, proc = documented_classifier
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    recipe = yaml.safe_load((cwd / "recipe.yaml").read_text())
    assert recipe["source"] == "models:/my-digits-net@champion" and recipe["data"]["provider"] == "sklearn-digits"
    rep = json.loads((cwd / "edgeslim-run" / "report.json").read_text())
    assert rep["gate"]["passed"] is True, rep["gate"]
    assert rep["registered"]["name"] == "my-digits-net-edge" and rep["registered"]["alias"] == "edge-candidate"
    assert (cwd / "edgeslim-run" / "report.html").is_file()
    assert "gate: PASSED" in proc.stdout


def test_the_documented_edge_model_loads_and_predicts(documented_classifier):
    cwd, uri, _ = documented_classifier
    proc = run_python(doc_block(PAGE, "load-edge-model"), cwd=cwd, env={"MLFLOW_TRACKING_URI": uri}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend, _, labels = proc.stdout.strip().splitlines()[-1].partition(" ")
    assert backend == "onnxruntime:CPUExecutionProvider"
    digits = labels.strip("[]").split()
    assert len(digits) == 4 and all(d in "0123456789" for d in digits)


def test_the_readmes_example_is_the_quickstarts(documented_classifier):
    """The README's two blocks: its commands are the quickstart's (run above), and its logging call runs
    here as written, on the model the quickstart trained (the README says `model` is the reader's)."""
    from mlflow import MlflowClient

    cwd, uri, _ = documented_classifier
    assert doc_block("README.md", "own-model-compress") in doc_block(PAGE, "own-classifier")
    client = MlflowClient(uri)
    before = int(client.get_model_version_by_alias("my-digits-net", "champion").version)
    prelude = "import mlflow\nmodel = mlflow.pytorch.load_model('models:/my-digits-net@champion')\n"
    proc = run_python(doc_block("README.md", "own-model-log"), cwd=cwd, env={"MLFLOW_TRACKING_URI": uri},
                      prelude=prelude, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = client.get_model_version_by_alias("my-digits-net", "champion")
    assert int(version.version) == before + 1
    import mlflow

    where = client.get_model_version_download_uri("my-digits-net", version.version)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, tracking_uri=uri,
                                                         dst_path=str(cwd / "downloaded")))
    assert (model_dir / "code" / f"{MODULE}.py").read_text() == doc_block(PAGE, "my-models")


def test_user_code_model_goes_through_distill_prune_and_qat(documented_classifier, tmp_path):
    from mlflow import MlflowClient

    _, uri, _ = documented_classifier
    assert importlib.util.find_spec(MODULE) is None  # not importable from this environment
    recipe = {
        "source": "models:/my-digits-net@champion",
        "data": {"provider": "sklearn-digits", "args": {"seed": 0}},
        "stages": [
            {"distill": {"method": "logit", "student": "width", "width": 0.75, "epochs": 10}},
            {"prune": {"method": "channel", "keep_fraction": 0.8, "finetune_epochs": 2, "distill": True}},
            {"quantize": {"method": "auto", "calibrators": ["percentile"], "num_samples": 256,
                          "max_float_layers": 1, "qat": True, "qat_epochs": 1}},
        ],
        "gate": {"max_metric_drop": 5.0, "min_top1_agreement": 0.9, "min_sqnr_db": 8.0},
        "evaluate": {"latency_warmup": 1, "latency_repeats": 3, "latency_batches": [1]},
        "register": {"alias": "edge-candidate", "experiment": "tests-user-code"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cwd = tmp_path / "cwd"  # `python -m` puts the cwd on sys.path: keep it empty
    cwd.mkdir()
    before = MlflowClient(uri).search_model_versions("name='my-digits-net-edge'")
    proc = run_cli("run", str(tmp_path / "recipe.yaml"), "--tracking-uri", uri,
                   "--workdir", str(tmp_path / "out"), env={"PYTHONPATH": ""}, cwd=cwd, timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr

    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["gate"]["passed"] is True
    assert rep["registered"]["name"] == "my-digits-net-edge"
    after = MlflowClient(uri).search_model_versions("name='my-digits-net-edge'")
    assert len(after) == len(before) + 1
    assert str(rep["registered"]["version"]) in {str(v.version) for v in after}
    # The student written by the transform task carried the parent's code to the quantize task.
    students = list((tmp_path / "out" / "kfp-local").rglob("transform-op/student"))
    assert students and (Path(str(students[0]) + ".code") / f"{MODULE}.py").read_text() == \
        doc_block(PAGE, "my-models")
