"""The whole pipeline through Kubeflow's local runner, against a real `mlflow server`.

Each bad input gets one clear line, a non-zero exit, no traceback, and nothing registered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

FAST = {"latency_warmup": 1, "latency_repeats": 3, "latency_batches": [1, 32]}


def write_recipe(path: Path, source: str, **over) -> Path:
    d = {
        "source": source,
        "data": {"provider": "sklearn-digits", "args": {"seed": 0}},
        "stages": [{"quantize": {"method": "ptq", "calibrator": "percentile", "num_samples": 256}}],
        "gate": {"max_metric_drop": 2.0, "min_top1_agreement": 0.95, "min_sqnr_db": 10.0},
        "evaluate": FAST,
        "register": {"alias": "edge-candidate", "experiment": "tests-edge"},
    }
    d.update(over)
    path.write_text(yaml.safe_dump(d))
    return path


def versions(uri: str, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(uri).search_model_versions(f"name='{name}'")


def assert_one_line_error(proc, needle: str, code: int = 2):
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgeslim: error:")]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    assert needle in err_lines[0], err_lines[0]


@pytest.fixture(scope="module")
def first_run(mlflow_server, registered_teacher, tmp_path_factory):
    wd = tmp_path_factory.mktemp("run1")
    recipe = write_recipe(wd / "recipe.yaml", registered_teacher)
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(wd / "out"))
    return proc, wd


def test_run_registers_a_gated_int8_candidate_with_lineage(first_run, mlflow_server):
    proc, wd = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((wd / "out" / "report.json").read_text())
    assert (wd / "out" / "report.html").read_text().startswith("<!doctype html>")
    assert rep["source"]["name"] == "tiny-teacher" and rep["source"]["version"] == "1"
    for k in ("uri", "metric", "size_bytes", "latency_ms"):
        assert k in rep["source"]
    for k in ("metric", "fidelity", "size_bytes", "latency_ms", "onnx_path"):
        assert k in rep["candidate"]
    assert set(rep["source"]["latency_ms"]) == {"batch_1", "batch_32"}
    assert rep["gate"]["passed"] is True
    assert rep["candidate"]["quantization"]["zero_points_all_zero"] is True
    assert Path(rep["candidate"]["onnx_path"]).is_file()
    assert rep["source"]["metric"] - rep["candidate"]["metric"] <= 2.0
    for stage in ("pull", "export", "quantize", "evaluate", "register"):
        assert rep["seconds"][stage] > 0
    assert rep["registered"] == {**rep["registered"], "name": "tiny-teacher-edge", "alias": "edge-candidate"}
    assert "digits-teacher" not in proc.stdout  # it ran the recipe's model, not the demo's

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    mv = client.get_model_version_by_alias("tiny-teacher-edge", "edge-candidate")
    assert mv.version == rep["registered"]["version"]
    parent = client.get_model_version("tiny-teacher", "1")
    t = mv.tags
    assert t["edgeslim.parent_name"] == "tiny-teacher" and t["edgeslim.parent_version"] == "1"
    assert t["edgeslim.parent_run_id"] == parent.run_id
    assert t["edgeslim.recipe_hash"] == rep["recipe_hash"]
    assert float(t["edgeslim.metric.candidate_metric"]) == pytest.approx(rep["candidate"]["metric"])
    assert float(t["edgeslim.metric.metric_drop_high"]) == pytest.approx(rep["confidence"]["drops"][0]["test"]["high"])
    # the fused int8 CPU kernel figure says on how many test images it was measured
    assert float(t["edgeslim.metric.cpu_int8_kernel_samples"]) == rep["candidate"]["cpu_int8_kernel_samples"]
    assert "edgeslim.version" in t
    # Lineage as run inputs: the parent LoggedModel and the calibration dataset.
    run = client.get_run(rep["registered"]["run_id"])
    model_inputs = [m.model_id for m in (run.inputs.model_inputs or [])]
    parent_model_id = parent.model_id or parent.source.split("/")[1]
    assert parent_model_id in model_inputs
    ds = [d for d in run.inputs.dataset_inputs if any(tag.value == "calibration" for tag in d.tags)]
    assert ds and ds[0].dataset.name.startswith("calibration-")
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.html"} <= arts
    # The registered edge model serves through pyfunc on this CPU machine.
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    from edgeslim.plugins.datasets import SklearnDigits

    x = SklearnDigits().load().x_test[:5]
    out = mlflow.pyfunc.load_model("models:/tiny-teacher-edge@edge-candidate").predict(x)
    assert "backend" in out and np.asarray(next(v for k, v in out.items() if k != "backend")).shape[0] == 5


def test_rerun_is_idempotent(first_run, mlflow_server, registered_teacher):
    proc, wd = first_run
    assert proc.returncode == 0
    before = len(versions(mlflow_server.uri, "tiny-teacher-edge"))
    again = run_cli("run", str(wd / "recipe.yaml"), "--tracking-uri", mlflow_server.uri,
                    "--workdir", str(wd / "out2"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reused" in again.stdout
    assert len(versions(mlflow_server.uri, "tiny-teacher-edge")) == before


def test_failing_gate_exits_3_with_a_report_and_registers_nothing(mlflow_server, registered_teacher, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", registered_teacher,
                          gate={"min_sqnr_db": 200.0}, register={"name": "tiny-gate-fail"})
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["gate"]["passed"] is False and rep["registered"] is None
    assert "sqnr_db missed by" in rep["gate"]["summary"]
    assert "Traceback" not in proc.stderr and "gate failed" in proc.stderr
    assert versions(mlflow_server.uri, "tiny-gate-fail") == []


def test_bad_source_uri_and_alias(mlflow_server, registered_teacher, tmp_path):
    for src, needle in (("models:/no-such-model@champion", "no registered model named 'no-such-model'"),
                        ("models:/tiny-teacher@nope", "has no alias 'nope' (its aliases: champion)"),
                        ("models:/tiny-teacher/99", "has no version 99")):
        recipe = write_recipe(tmp_path / "r.yaml", src)
        proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
        assert_one_line_error(proc, needle)


def test_not_a_pytorch_model(mlflow_server, tmp_path):
    import mlflow
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("tests-bad")
    with mlflow.start_run():
        mlflow.sklearn.log_model(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), name="m",
                                 registered_model_name="an-sklearn-model")
    recipe = write_recipe(tmp_path / "r.yaml", "models:/an-sklearn-model/1")
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, "is a sklearn model, not a PyTorch module")
    assert versions(mlflow_server.uri, "an-sklearn-model-edge") == []


def test_a_model_with_two_inputs_is_refused_before_anything_runs(mlflow_server, tmp_path):
    import mlflow
    import torch

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("tests-bad")
    with mlflow.start_run():  # torch's own two-input module: forward(input1, input2)
        mlflow.pytorch.log_model(torch.nn.Bilinear(64, 64, 10), name="m", serialization_format="pickle",
                                 registered_model_name="a-two-input-model")
    recipe = write_recipe(tmp_path / "r.yaml", "models:/a-two-input-model/1")
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, "forward() takes 2 inputs (input1, input2); edgeslim compresses models with one "
                                "input tensor: register a wrapper module")
    assert versions(mlflow_server.uri, "a-two-input-model-edge") == []
    assert not (tmp_path / "o" / "kfp-local").exists()  # refused before the pipeline started


def test_recipe_error_is_reported_before_anything_runs(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "models:/x@y", gate={"max_metric_dorp": 1})
    proc = run_cli("run", str(recipe), "--tracking-uri", "http://127.0.0.1:9", "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, "gate.max_metric_dorp: unknown key; did you mean 'max_metric_drop'?")


def test_data_the_model_rejects(mlflow_server, registered_teacher, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.random((20, 3, 16, 16), dtype=np.float32) for s in ("train", "val", "test")}
    arrays.update({f"y_{s}": rng.integers(0, 10, 20) for s in ("train", "val", "test")})
    np.savez(tmp_path / "wrong.npz", **arrays)
    recipe = write_recipe(tmp_path / "r.yaml", registered_teacher,
                          data={"provider": "npz", "args": {"path": str(tmp_path / "wrong.npz")}},
                          register={"name": "tiny-wrong-data"})
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, "the model rejects inputs of shape [4, 3, 16, 16]")
    assert versions(mlflow_server.uri, "tiny-wrong-data") == []


def test_mlflow_server_down_names_the_uri(tmp_path):
    from edgeslim.components.common.mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    recipe = write_recipe(tmp_path / "r.yaml", "models:/tiny-teacher@champion")
    proc = run_cli("run", str(recipe), "--tracking-uri", uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, f"MLflow tracking server at {uri} is not reachable")


def test_corrupt_model_artifact(mlflow_server, tiny_teacher, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("tests-bad")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(tiny_teacher, name="model", serialization_format="pickle",
                                        registered_model_name="corrupt-teacher")
    files = [p for p in (mlflow_server.root / "artifacts").rglob("model.pth") if info.model_id in str(p)]
    assert files, "the logged model's weights file was not found in the artifact store"
    files[0].write_bytes(b"this is not a torch pickle")
    recipe = write_recipe(tmp_path / "r.yaml", "models:/corrupt-teacher/1")
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, "is corrupt or unreadable")
    assert versions(mlflow_server.uri, "corrupt-teacher-edge") == []


def test_debug_shows_the_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "models:/x@y", gate={"max_metric_dorp": 1})
    proc = run_cli("--debug", "run", str(recipe), "--workdir", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_init_writes_a_recipe_that_run_accepts(mlflow_server, registered_teacher, tmp_path):
    out = tmp_path / "recipe.yaml"
    proc = run_cli("init", "--source", registered_teacher, "--data", "sklearn-digits", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.count("#") > 10  # commented
    from edgeslim.components.recipe import load_recipe

    r = load_recipe(out)
    assert r.source == registered_teacher and r.register.model_name("tiny-teacher") == "tiny-teacher-edge"
    assert r.data.provider == "sklearn-digits" and r.task.kind == "classification"
    again = run_cli("init", "--source", registered_teacher, "--data", "sklearn-digits", "-o", str(out))
    assert_one_line_error(again, "exists; pass --force")
    npz = run_cli("init", "--source", registered_teacher, "--npz", "s3://bucket/d.npz", "-o", str(tmp_path / "n.yaml"))
    assert npz.returncode == 0 and load_recipe(tmp_path / "n.yaml").data.provider == "npz"
    # init could not look at the labels (no S3 here): it says what it assumed
    assert "could not read --npz" in npz.stderr and "pass --task detection" in npz.stderr


def test_compile_writes_kfp_ir(tmp_path):
    out = tmp_path / "p.yaml"
    proc = run_cli("compile", "-o", str(out), "--base-image", "registry.example/edgeslim:test",
                   "--engine-image", "registry.example/edgeslim:test-trt")
    assert proc.returncode == 0, proc.stderr
    ir = next(yaml.safe_load_all(out.read_text()))
    assert ir["pipelineInfo"]["name"] == "edgeslim-edge-compression"
    images = {name: e["container"]["image"] for name, e in ir["deploymentSpec"]["executors"].items()}
    # The default device class is a Jetson (Orin, JetPack 6.1): its engine builds on the arm64 JetPack
    # image (--engine-image is the x86_64 TensorRT image of datacenter classes); every other task on the
    # base image.
    assert images.pop("exec-engine-build-op").endswith("-jetpack6.1")
    assert set(images.values()) == {"registry.example/edgeslim:test"}


def test_submit_to_an_unreachable_endpoint_is_one_line(tmp_path):
    from edgeslim.components.common.mlflow_server import free_port

    recipe = write_recipe(tmp_path / "r.yaml", "models:/x@y")
    proc = run_cli("submit", str(recipe), "--host", f"http://127.0.0.1:{free_port()}", timeout=300)
    assert_one_line_error(proc, "cannot reach Kubeflow Pipelines at http://127.0.0.1:")


# --- Pictures people look at, and MLflow that tells the story ---------------------------


def _kfp_task_dir(wd: Path, task: str) -> Path:
    (run,) = (wd / "out" / "kfp-local").iterdir()  # one local pipeline run per workdir
    return run / task


def _kfp_metrics(wd: Path, task: str, output: str = "metrics") -> dict:
    out = json.loads((_kfp_task_dir(wd, task) / "executor_output.json").read_text())
    return out["artifacts"][output]["artifacts"][0]["metadata"]


def test_the_report_of_a_real_run_renders_its_charts_in_a_browser_and_fetches_nothing(first_run, tmp_path):
    from tests.integration.test_report_browser import assert_renders_offline

    proc, wd = first_run
    assert proc.returncode == 0
    seen = assert_renders_offline(wd / "out" / "report.html", tmp_path / "browser", {"output-error"})
    # PTQ without a search, nothing trained: each absent chart is one line saying why
    assert [ln["id"] for ln in seen["lines"]] == ["chart-trials", "chart-sensitivity", "chart-training"]
    assert "quantize method ptq" in seen["lines"][0]["text"]


def test_each_kfp_task_writes_its_metrics_and_the_gate_its_verdict_as_markdown(first_run):
    proc, wd = first_run
    assert proc.returncode == 0
    rep = json.loads((wd / "out" / "report.json").read_text())
    ev = _kfp_metrics(wd, "evaluate-op")
    assert ev["source_top1"] == pytest.approx(rep["source"]["metric"])
    assert ev["candidate_top1"] == pytest.approx(rep["candidate"]["metric"])
    assert ev["top1_agreement"] == pytest.approx(rep["candidate"]["fidelity"]["top1_agreement"])
    assert ev["sqnr_db"] == pytest.approx(rep["candidate"]["fidelity"]["sqnr_db"])
    assert ev["candidate_size_bytes"] == rep["candidate"]["size_bytes"] and ev["size_ratio"] > 1
    assert {"source_latency_ms_batch_1", "candidate_latency_ms_batch_32"} <= set(ev)
    # ORT's fused int8 CPU kernels on a sample of the test images, the candidate's Q/DQ top-1 on the same ones
    cand = rep["candidate"]
    assert 0 < cand["cpu_int8_kernel_samples"] <= rep["test_samples"] and ev["cpu_int8_kernel_samples"] == cand[
        "cpu_int8_kernel_samples"]
    assert ev["cpu_int8_kernel_qdq_metric"] == pytest.approx(cand["cpu_int8_kernel_qdq_metric"])
    # nothing pruned: the candidate has its parent's MACs and parameters (the parent's export counted both)
    assert ev["source_macs"] == ev["candidate_macs"] == rep["candidate"]["macs"] > 0
    assert ev["source_params"] == ev["candidate_params"] == rep["source"]["params"] > 0
    # the candidate's confusion matrix as KFP ClassificationMetrics: true class by row, its top-1 agrees
    cm = _kfp_metrics(wd, "evaluate-op", "confusion")["confusionMatrix"]
    assert [c["displayName"] for c in cm["annotationSpecs"]] == [str(i) for i in range(10)]
    rows = [r["row"] for r in cm["rows"]]
    total = sum(map(sum, rows))
    assert total == rep["test_samples"]
    assert 100.0 * sum(rows[i][i] for i in range(10)) / total == pytest.approx(rep["candidate"]["metric"], abs=1e-3)
    q = _kfp_metrics(wd, "quantize-op")
    assert q["trials"] == 0 and q["size_bytes"] == rep["candidate"]["size_bytes"] and q["calibration_samples"] == 256
    # A recipe without distill or prune runs no transform task and exports once: quantize starts from
    # the parent's export.
    tasks = {d.name for d in _kfp_task_dir(wd, "gate-op").parent.iterdir()}
    assert {"pull-op", "export-op", "quantize-op", "evaluate-op"} <= tasks
    assert "transform-op" not in tasks and "export-op-2" not in tasks
    assert rep["transform"]["stages"] == [] and rep["seconds"]["transform"] == 0.0
    md = (_kfp_task_dir(wd, "gate-op") / "verdict_md").read_text()
    assert md.startswith("## Gate: passed\n") and "| sqnr_db | " in md and md.count("| pass |") == 3
    # the top-1 drop with its 95% interval over the test images, in the report and the KFP metrics (method ptq
    # judges nothing on val)
    (drop,) = rep["confidence"]["drops"]
    assert drop["name"] == "metric_drop" and drop["val"] is None and drop["test"]["n"] == rep["test_samples"]
    assert drop["test"]["low"] <= ev["top1_drop"] <= drop["test"]["high"]
    assert (ev["metric_drop_low"], ev["metric_drop_high"]) == pytest.approx((drop["test"]["low"], drop["test"]["high"]))


def test_the_registered_version_has_a_signature_environment_files_a_description_and_run_links(first_run, mlflow_server):
    import mlflow
    import yaml as _yaml
    from mlflow import MlflowClient

    proc, wd = first_run
    assert proc.returncode == 0
    rep = json.loads((wd / "out" / "report.json").read_text())
    client = MlflowClient(mlflow_server.uri)
    mv = client.get_model_version("tiny-teacher-edge", rep["registered"]["version"])
    assert mv.description.startswith("int8 Q/DQ ONNX (edgeslim ")
    assert f"models:/tiny-teacher/1, recipe {rep['recipe_hash']}" in mv.description
    assert "Gate: passed, passed: top-1 fell" in mv.description and "x smaller" in mv.description
    # the KFP run (the local runner's id and run name) on the version and on the registration run
    run_name = next((wd / "out" / "kfp-local").iterdir()).name
    assert rep["runs"]["kfp_run_name"] == run_name and rep["runs"]["kfp_run_id"]
    run = client.get_run(rep["registered"]["run_id"])
    for tags in (mv.tags, run.data.tags):
        assert tags["edgeslim.kfp_run_id"] == rep["runs"]["kfp_run_id"]
        assert tags["edgeslim.kfp_run_name"] == run_name
    assert "edgeslim.quantize_run_id" not in mv.tags  # PTQ runs no MLflow run of its own
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "charts")}
    assert arts == {"charts/output-error.svg"}
    # the edge model: signature from the ONNX, requirements.txt / python_env.yaml named in MLmodel
    mlflow.set_tracking_uri(mlflow_server.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-teacher-edge/{mv.version}"))
    info = mlflow.models.get_model_info(f"models:/tiny-teacher-edge/{mv.version}")
    sig = {k: json.loads(v) for k, v in info.signature.to_dict().items() if v}
    assert sig["inputs"] == [{"name": "input", "type": "tensor",
                              "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 8, 8]}}]
    assert sig["outputs"][0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 10]}
    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} == {"mlflow", "edgeslim", "onnxruntime", "numpy"}
    assert all("==" in r for r in reqs)
    assert _yaml.safe_load((local / "python_env.yaml").read_text())["dependencies"] == ["-r requirements.txt"]
    env = _yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["env"]
    assert env == {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}


def test_training_curves_and_the_quantize_run_are_logged_to_the_registration(mlflow_server, registered_teacher,
                                                                               tmp_path):
    from mlflow import MlflowClient

    from tests.integration.test_report_browser import assert_renders_offline

    recipe = write_recipe(
        tmp_path / "r.yaml", registered_teacher, register={"name": "tiny-curves", "experiment": "tests-edge"},
        stages=[{"distill": {"method": "logit", "student": "previous", "epochs": 2, "lr": 1e-4}},
                {"prune": {"method": "channel", "keep_fraction": 0.9, "steps": 2, "finetune_epochs": 1}},
                {"quantize": {"method": "qat", "calibrator": "percentile", "num_samples": 256, "epochs": 2}}],
        gate={"max_metric_drop": 20.0, "min_top1_agreement": 0.5, "min_sqnr_db": 5.0})
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in rep["training_curve"]] == [
        ("distill", 1), ("distill", 2), ("prune", 1), ("prune", 2), ("qat", 1), ("qat", 2)]
    client = MlflowClient(mlflow_server.uri)
    run_id = rep["registered"]["run_id"]
    for stage in ("distill", "prune", "qat"):
        hist = client.get_metric_history(run_id, f"train.{stage}.loss")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2]
        want = [r["loss"] for r in rep["training_curve"] if r["stage"] == stage]
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(want)
    # the quantize task's own run, linked both ways with the registration
    qid = rep["runs"]["quantize"]
    mv = client.get_model_version("tiny-curves", rep["registered"]["version"])
    assert mv.tags["edgeslim.quantize_run_id"] == qid
    assert client.get_run(run_id).data.tags["edgeslim.quantize_run_id"] == qid
    qrun = client.get_run(qid)
    assert qrun.info.run_name.startswith("quantize qat: ")
    assert qrun.data.tags["edgeslim.compression_run_id"] == run_id
    assert qrun.data.tags["edgeslim.model_version"] == f"tiny-curves/{mv.version}"
    arts = {a.path for a in client.list_artifacts(run_id, "charts")}
    assert arts == {"charts/output-error.svg", "charts/training.svg"}
    tm = _kfp_metrics(tmp_path, "transform-op")
    assert tm["stages"] == 2 and tm["macs_after"] < tm["macs_before"] and tm["distill_epochs"] == 2
    qm = _kfp_metrics(tmp_path, "quantize-op")
    assert qm["qat_epochs"] == 2 and qm["qat_final_loss"] == pytest.approx(rep["training_curve"][-1]["loss"], abs=1e-6)
    # one loss figure: the progress line prints the epoch's loss the curve records and MLflow logs
    for stage, pattern in (("distill", r"distill\S*: epoch 2/2, loss ([0-9.]+)"),
                           ("qat", r"qat\S*: epoch 2/2, loss ([0-9.]+)")):
        printed = [float(v) for v in re.findall(pattern, proc.stderr)]
        want = [r["loss"] for r in rep["training_curve"] if r["stage"] == stage][-1]
        assert printed and printed[-1] == pytest.approx(want, abs=1e-4), (stage, printed, want)
    # MACs and parameters of both, as the exports counted them: the transform's before and after
    assert (rep["source"]["macs"], rep["candidate"]["macs"]) == (tm["macs_before"], tm["macs_after"])
    assert (rep["source"]["params"], rep["candidate"]["params"]) == (tm["params_before"], tm["params_after"])
    logged = client.get_run(run_id).data.metrics
    ev = _kfp_metrics(tmp_path, "evaluate-op")
    for k in ("source_macs", "candidate_macs", "source_params", "candidate_params"):
        who, what = k.split("_")
        assert logged[k] == ev[k] == rep[who][what] == float(mv.tags[f"edgeslim.metric.{k}"])
    seen = assert_renders_offline(tmp_path / "out" / "report.html", tmp_path / "browser", {"output-error", "training"})
    assert "distill 2 epoch(s); prune 2 epoch(s); qat 2 epoch(s)" in next(
        c["caption"] for c in seen["charts"] if c["id"] == "chart-training")
