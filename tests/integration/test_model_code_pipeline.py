"""A model class from the user's own module, logged with MLflow's ``code_paths``, goes through
distill -> prune -> quantize (auto, QAT allowed) in Kubeflow's local runner: every task is a
fresh process where that module exists only as the code that travels with the model."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

MODULE = "my_models"
SOURCE = textwrap.dedent('''
    """The user's own classifier for 1x8x8 digits (not part of edgeslim)."""
    import torch
    from torch import nn


    class UserDigitsNet(nn.Module):
        def __init__(self, width=8, num_classes=10):
            super().__init__()
            w = width

            def block(cin, cout):
                return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

            self.body = nn.Sequential(*block(1, w), *block(w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 4 * w), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 2 * 2, 4 * w), nn.ReLU(),
                                      nn.Linear(4 * w, num_classes))

        def forward(self, x):
            return self.head(self.body(x))
''')


@pytest.fixture(scope="module")
def registered_user_model(mlflow_server, digits, tmp_path_factory):
    """UserDigitsNet from a temporary module outside the repo, logged with code_paths and registered."""
    import mlflow
    import torch

    from edgeslim.components.common.tracking import connect
    from edgeslim.components.reference.digits import train_classifier

    src = tmp_path_factory.mktemp("user-src")
    (src / f"{MODULE}.py").write_text(SOURCE)
    assert importlib.util.find_spec(MODULE) is None
    sys.path.insert(0, str(src))
    try:
        mod = importlib.import_module(MODULE)
        torch.manual_seed(0)
        model = train_classifier(mod.UserDigitsNet(width=12), digits.x_train, digits.y_train, epochs=10, seed=0)
        client = connect(mlflow_server.uri)
        mlflow.set_experiment("tests-user-code")
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(model, name="model", code_paths=[str(src / f"{MODULE}.py")],
                                            serialization_format="pickle",
                                            registered_model_name="user-code-net")
        client.set_registered_model_alias("user-code-net", "champion", info.registered_model_version)
    finally:
        sys.path.remove(str(src))
        sys.modules.pop(MODULE, None)
    (src / f"{MODULE}.py").unlink()  # from now on it exists only in the registered model's code/
    return "models:/user-code-net@champion"


def test_user_code_model_goes_through_distill_prune_and_qat(registered_user_model, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    assert importlib.util.find_spec(MODULE) is None  # not importable from this environment
    recipe = {
        "source": registered_user_model,
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
    before = MlflowClient(mlflow_server.uri).search_model_versions("name='user-code-net-edge'")
    proc = run_cli("run", str(tmp_path / "recipe.yaml"), "--tracking-uri", mlflow_server.uri,
                   "--workdir", str(tmp_path / "out"), env={"PYTHONPATH": ""}, cwd=cwd, timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr

    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["gate"]["passed"] is True
    assert rep["registered"]["name"] == "user-code-net-edge"
    after = MlflowClient(mlflow_server.uri).search_model_versions("name='user-code-net-edge'")
    assert len(after) == len(before) + 1
    assert str(rep["registered"]["version"]) in {str(v.version) for v in after}
    # The student written by the transform task carried the parent's code to the quantize task.
    students = list((tmp_path / "out" / "kfp-local").rglob("transform-op/student"))
    assert students and (Path(str(students[0]) + ".code") / f"{MODULE}.py").read_text() == SOURCE
