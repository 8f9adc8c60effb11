"""The compression stages against a real MLflow server (SQLite) on loopback: a student taken from the
registry, and the accuracy-aware search's trials as child runs of the quantize run, which carries the
winner's figures."""

import sys
from pathlib import Path

import pytest

from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, LogitDistillConfig, OnnxExportConfig
from edgeslim.components.export import export
from edgeslim.components.tasks.classification.search import quantize_auto
from edgeslim.components.recipe import AccuracyGateConfig
from edgeslim.components.reference.digits import DigitsCNN
from edgeslim.components.transform.distill import distill
from edgeslim.plugins.datasets import SklearnDigits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from compress_models import trained  # noqa: E402  (the unit tests' cached tiny models)

pytestmark = pytest.mark.slow


def test_student_from_a_registered_model_and_trials_as_child_runs(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from edgeslim.components.common.errors import GateRejected

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mlflow.set_tracking_uri(mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    data, teacher = SklearnDigits().load(), trained("cnn")
    small = DigitsCNN(width=4)
    with mlflow.start_run():
        mlflow.pytorch.log_model(small, name="student", serialization_format="pickle",
                                 registered_model_name="digits-student")
    client.set_registered_model_alias("digits-student", "base", "1")

    res = distill(teacher, LogitDistillConfig(student="uri", student_uri="models:/digits-student@base", epochs=2),
                  data=data, teacher=teacher)
    assert res.lineage["student"] == "models:/digits-student@base"
    assert res.metrics["student_params"] == sum(p.numel() for p in small.parameters())
    assert res.metrics["student_top1_val"] > res.metrics["student_top1_val_before"]

    fp32 = export(teacher, OnnxExportConfig(), data=data, out_path=tmp_path / "t.onnx").model
    exp = mlflow.set_experiment("edgeslim-autotune-test")
    parent = client.create_run(exp.experiment_id, run_name="quantize")

    def search(cfg, gate, out):
        return quantize_auto(teacher, fp32, cfg, data=data, parent_onnx_path=fp32, gate=gate, out_dir=out,
                             tracking_uri=mlflow_server.uri, parent_run_id=parent.info.run_id)

    impossible = AccuracyGateConfig(max_metric_drop=100.0, min_top1_agreement=0.0, min_sqnr_db=200.0)
    with pytest.raises(GateRejected):
        search(AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=64, max_float_layers=1, qat=False,
                                           placement="all"),
               impossible, tmp_path / "refused")
    won = search(AccuracyAwareQuantizeConfig(calibrators=["minmax", "percentile"], num_samples=64),
                 AccuracyGateConfig(), tmp_path / "passed")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted(r.data.tags["edgeslim.trial_kind"] for r in children)
    assert kinds == ["fallback", "ptq", "ptq"]  # two trials refused, then one that passed
    passed = [r for r in children if r.data.tags["edgeslim.gate_passed"] == "True"]
    assert len(passed) == 1 and "sqnr_db" in passed[0].data.metrics
    assert {r.data.params["placement"] for r in children} == {"all"}
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "sensitivity")]
    assert "sensitivity/sensitivity.svg" in arts
    assert won.metrics["winner"]["trial"] == 1
    # the search's own run carries the chosen trial's figures (the last search's: one trial, it passed)
    search_run = client.get_run(parent.info.run_id).data
    chosen = passed[0].data
    assert {k: search_run.metrics[k] for k in chosen.metrics} == chosen.metrics
    assert search_run.metrics["trials"] == 1 and search_run.metrics["float_layers"] == 0
    assert search_run.params["calibrator"] == chosen.params["calibrator"] == "minmax"
    assert search_run.tags["edgeslim.gate_passed"] == "True"
