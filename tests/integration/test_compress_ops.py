"""The compression components: called directly with real artifacts, run through Kubeflow's
local runner, and logging to a real MLflow server (SQLite) on loopback."""

import json
import sys
from pathlib import Path

import pytest
import torch

from edgeslim.components.common.model_io import load_module, save_module
from tests.spread import measured
from edgeslim.components.reference.digits import DigitsCNN
from edgeslim.components.reference.mobile import DigitsMobileNet
from edgeslim.components.kfp.compress_ops import make_compress_ops
from edgeslim.plugins.datasets import SklearnDigits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from compress_models import trained  # noqa: E402  (the unit tests' cached tiny models)

OPS = make_compress_ops()
distill_op, prune_op, qat_op = OPS.distill_op, OPS.prune_op, OPS.qat_op
sensitivity_op, quantize_auto_op = OPS.sensitivity_op, OPS.quantize_auto_op

pytestmark = pytest.mark.slow
DATA_JSON = json.dumps({"provider": "sklearn-digits", "args": {}})


def _artifact(path, cls="Model"):
    from kfp import dsl

    return getattr(dsl, cls)(name=Path(path).stem, uri=str(path), metadata={})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: save_module(trained(kind), root / f"{kind}.pt") for kind in ("cnn", "mobile")}


@pytest.mark.parametrize("kind", ["cnn", "mobile"])
def test_prune_then_distill_components(models, tmp_path, kind):
    pruned, info = tmp_path / "pruned.pt", tmp_path / "prune.json"
    prune_op.python_func(config_json=json.dumps({"method": "channel", "keep_fraction": 0.5, "finetune_epochs": 1}),
                         data_json=DATA_JSON, model=_artifact(models[kind]), pruned=_artifact(pruned),
                         info=_artifact(info, "Artifact"))
    m = json.loads(info.read_text())
    assert m["macs_after"] <= 0.51 * m["macs_before"]
    assert load_module(pruned)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)

    student, dinfo = tmp_path / "student.pt", tmp_path / "distill.json"
    distill_op.python_func(config_json=json.dumps({"method": "logit", "student": "previous", "epochs": 1}),
                           data_json=DATA_JSON, model=_artifact(pruned), teacher=_artifact(models[kind]),
                           student=_artifact(student), info=_artifact(dinfo, "Artifact"))
    dm = json.loads(dinfo.read_text())
    assert dm["student_macs"] == m["macs_after"] and dm["lineage"]["student"] == "previous stage"


def test_qat_and_sensitivity_components(models, tmp_path):
    qdq, info = tmp_path / "qat.onnx", tmp_path / "qat.json"
    qat_op.python_func(config_json=json.dumps({"method": "qat", "epochs": 1, "num_samples": 128}),
                       data_json=DATA_JSON, model=_artifact(models["cnn"]), qdq_model=_artifact(qdq),
                       info=_artifact(info, "Artifact"))
    m = json.loads(info.read_text())
    assert m["zero_points_all_zero"] and measured("kfp.qat_fake_quant_vs_onnx_pt", m["fake_quant_vs_onnx_pt"]) <= 0.5
    import onnx

    onnx.checker.check_model(str(qdq))

    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    fp32 = export(load_module(models["mobile"]), OnnxExportConfig(), data=SklearnDigits().load(),
                  out_path=tmp_path / "m.onnx").model
    table, chart = tmp_path / "sens.json", tmp_path / "sens.png"
    sensitivity_op.python_func(config_json=json.dumps({"method": "ptq", "calibrator": "minmax", "num_samples": 64}),
                               data_json=DATA_JSON, onnx_model=_artifact(fp32), table=_artifact(table, "Artifact"),
                               chart=_artifact(chart, "Artifact"))
    rows = json.loads(table.read_text())["layers"]
    assert len(rows) >= 15 and chart.read_bytes()[:4] == b"\x89PNG"


def test_student_from_a_registered_model_and_trials_as_child_runs(models, mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    mlflow_server = mlflow_server.uri  # the shared real `mlflow server` (tests/conftest.py)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    small = DigitsCNN(width=4)
    with mlflow.start_run():
        mlflow.pytorch.log_model(small, name="student", serialization_format="pickle",
                                 registered_model_name="digits-student")
    client.set_registered_model_alias("digits-student", "base", "1")

    student, dinfo = tmp_path / "student.pt", tmp_path / "distill.json"
    distill_op.python_func(
        config_json=json.dumps({"method": "logit", "student": "uri", "student_uri": "models:/digits-student@base",
                                "epochs": 2}),
        data_json=DATA_JSON, model=_artifact(models["cnn"]), teacher=_artifact(models["cnn"]),
        student=_artifact(student), info=_artifact(dinfo, "Artifact"))
    dm = json.loads(dinfo.read_text())
    assert dm["lineage"]["student"] == "models:/digits-student@base"
    assert dm["student_params"] == sum(p.numel() for p in small.parameters())
    assert dm["student_top1_val"] > dm["student_top1_val_before"]

    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    fp32 = export(load_module(models["cnn"]), OnnxExportConfig(), data=SklearnDigits().load(),
                  out_path=tmp_path / "t.onnx").model
    exp = mlflow.set_experiment("edgeslim-autotune-test")
    parent = client.create_run(exp.experiment_id, run_name="compress")
    qdq, info = tmp_path / "auto.onnx", tmp_path / "auto.json"
    impossible = {"max_metric_drop": 100.0, "min_top1_agreement": 0.0, "min_sqnr_db": 200.0}
    with pytest.raises(Exception) as e:
        quantize_auto_op.python_func(
            config_json=json.dumps({"method": "auto", "calibrators": ["minmax"], "num_samples": 64,
                                    "max_float_layers": 1, "qat": False}),
            gate_json=json.dumps(impossible), data_json=DATA_JSON, tracking_uri=mlflow_server,
            parent_run_id=parent.info.run_id, model=_artifact(models["cnn"]), onnx_model=_artifact(fp32),
            parent_onnx=_artifact(fp32), qdq_model=_artifact(qdq), info=_artifact(info, "Artifact"))
    assert type(e.value).__name__ == "GateRejected"
    quantize_auto_op.python_func(
        config_json=json.dumps({"method": "auto", "calibrators": ["minmax", "percentile"], "num_samples": 64}),
        gate_json="{}", data_json=DATA_JSON, tracking_uri=mlflow_server, parent_run_id=parent.info.run_id,
        model=_artifact(models["cnn"]), onnx_model=_artifact(fp32), parent_onnx=_artifact(fp32),
        qdq_model=_artifact(qdq), info=_artifact(info, "Artifact"))
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted(r.data.tags["edgeslim.trial_kind"] for r in children)
    assert kinds == ["fallback", "ptq", "ptq"]  # two trials refused, then one that passed
    passed = [r for r in children if r.data.tags["edgeslim.gate_passed"] == "True"]
    assert len(passed) == 1 and "sqnr_db" in passed[0].data.metrics
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "sensitivity")]
    assert "sensitivity/sensitivity.png" in arts
    assert json.loads(info.read_text())["winner"]["trial"] == 1


def test_components_run_in_the_kfp_local_runner(tmp_path):
    from kfp import dsl, local
    from kfp.dsl import Model, Output

    ops = OPS

    @dsl.component(install_kfp_package=False)
    def make_model(model: Output[Model]):
        from edgeslim.components.common.model_io import save_module
        from edgeslim.components.reference.mobile import DigitsMobileNet

        save_module(DigitsMobileNet(width=0.5), model.path)

    @dsl.pipeline
    def compress(data_json: str) -> Model:
        teacher = make_model()
        pruned = ops.prune_op(config_json=json.dumps({"method": "channel", "keep_fraction": 0.5,
                                                      "finetune_epochs": 1}),
                              data_json=data_json, model=teacher.outputs["model"])
        student = ops.distill_op(config_json=json.dumps({"method": "logit", "student": "previous", "epochs": 1}),
                                 data_json=data_json, model=pruned.outputs["pruned"],
                                 teacher=teacher.outputs["model"])
        return student.outputs["student"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = compress(data_json=DATA_JSON)
    out = task.output
    model = load_module(out.path)
    full = DigitsMobileNet(width=0.5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
