"""The whole pipeline on image splits that refuse to be held whole.

``tests/lazy_guard.py`` installed as a distribution (``tests/entry_points.py``) gives the providers
``guarded-imagefolder`` and ``guarded-yolo``: the real image providers, whose splits raise on ``np.asarray``
and on any read of more than 64 rows at once. Every split here is larger than that, so ``edgeslim run``
(Kubeflow's local runner, a real `mlflow server`) passes only if no task (preflight, export, the
accuracy-aware search judging on val, PTQ, evaluate with its figures, register with MLflow's dataset input
and input example, report) holds a split: once for a classifier, once for a detector.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import register_champion, run_cli
from tests.entry_points import install_entry_points
from tests.image_datasets import write_detection, write_imagefolder

pytestmark = pytest.mark.slow

GUARD = Path(__file__).resolve().parents[1] / "lazy_guard.py"
COUNTS = (160, 80, 80)  # train, val, test: each split is larger than the guard's 64 rows
FAST = {"latency_warmup": 1, "latency_repeats": 2, "latency_batches": [1]}
SEARCH = {"method": "auto", "num_samples": 96, "max_float_layers": 0, "qat": False}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The guarded providers on ``$PYTHONPATH`` of the processes the tests start (and on this one's path)."""
    with pytest.MonkeyPatch.context() as mp:
        site = install_entry_points(
            tmp_path_factory.mktemp("lazy-guard"), mp,
            {"edgeslim.datasets": {"guarded-imagefolder": "edgeslim_lazy_guard:GuardedImageFolder",
                                   "guarded-yolo": "edgeslim_lazy_guard:GuardedYolo"}},
            modules={"edgeslim_lazy_guard.py": GUARD.read_text()}, dist="edgeslim-lazy-guard")
        yield {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


def run(recipe: dict, tmp_path: Path, uri: str, env: dict) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("run", str(path), "--tracking-uri", uri, "--workdir", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out" / "report.json").read_text())


def calibration_input(uri: str, run_id: str):
    from mlflow import MlflowClient

    (ds,) = [d for d in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
             if any(t.key == "mlflow.data.context" and t.value == "calibration" for t in d.tags)]
    return ds, {t.key: t.value for t in ds.tags}


def test_the_guard_refuses_a_whole_split(env, tmp_path):
    import edgeslim_lazy_guard as guard

    write_imagefolder(tmp_path, counts=COUNTS)
    data = guard.GuardedImageFolder(root=str(tmp_path), preprocess={"resize": [8, 8]}).load()
    assert data.x_test[:64].shape == (64, 3, 8, 8)
    with pytest.raises(guard.WholeSplitRead, match="80 rows of the test split"):
        data.x_test[:]
    with pytest.raises(guard.WholeSplitRead, match="np.asarray of the whole train split"):
        np.asarray(data.x_train)


def test_a_classifier_goes_through_every_task_on_guarded_splits(mlflow_server, registered_teacher, env, tmp_path):
    write_imagefolder(tmp_path / "images", counts=COUNTS)
    rep = run({"source": registered_teacher,
               "data": {"provider": "guarded-imagefolder", "args": {"root": str(tmp_path / "images")},
                        "preprocess": {"resize": [8, 8], "channel_order": "GRAY"}},
               "stages": [{"quantize": {**SEARCH, "calibrators": ["minmax"]}}],
               # the teacher learnt scikit-learn's digits, not these PNGs: the wiring is what is tested
               "gate": {"max_metric_drop": 100.0, "min_top1_agreement": 0.0, "min_sqnr_db": 0.0},
               "evaluate": FAST, "register": {"name": "guarded-digits-edge", "experiment": "tests-lazy"}},
              tmp_path, mlflow_server.uri, env)
    assert rep["test_samples"] == COUNTS[2] and rep["gate"]["passed"]
    assert rep["candidate"]["quantization"]["trials"][0]["calibrator"] == "minmax"  # judged on val
    assert rep["figures"]["output_error"]["histogram"]["total"] > 0  # from evaluate's one pass
    ds, tags = calibration_input(mlflow_server.uri, rep["registered"]["run_id"])
    # a few rows stand for the 96 calibration samples in MLflow's profile; the input says so
    assert tags["samples"] == "96" and "first 8 of the 96 calibration samples" in tags["profile"]
    assert json.loads(ds.dataset.profile)["features_shape"] == [8, 1, 8, 8]


def test_a_detector_goes_through_every_task_on_guarded_splits(mlflow_server, env, tmp_path):
    import torch

    from edgeslim.components.common.data import load_data
    from edgeslim.components.reference.detector import DigitsDetector, default_heads, train_detector

    write_detection(tmp_path / "shapes", counts=COUNTS)
    args, pre = {"path": str(tmp_path / "shapes" / "data.yaml")}, {"letterbox": 48, "channel_order": "GRAY"}
    data = load_data("yolo", args, pre)
    torch.manual_seed(0)
    model = train_detector(DigitsDetector(width=4, head_hidden=4, num_classes=3), data.x_train[:64],
                           data.y_train[:64], epochs=1, batch_size=16)
    register_champion(mlflow_server.uri, model.eval(), "guarded-detector", "tests-lazy")
    rep = run({"source": "models:/guarded-detector@champion",
               "data": {"provider": "guarded-yolo", "args": args, "preprocess": pre},
               "task": {"kind": "detection", "num_classes": 3, "decoder": {"heads": default_heads()},
                        "gate": {"max_map_drop": 100.0, "max_map50_95_drop": 100.0, "max_tp_score_drop": 1.0,
                                 "max_recall_drop": 100.0}},
               "stages": [{"quantize": {**SEARCH, "calibrators": ["percentile"]}}],
               "evaluate": FAST, "register": {"experiment": "tests-lazy"}},
              tmp_path, mlflow_server.uri, env)
    assert rep["metric_name"] == "map50" and rep["test_samples"] == COUNTS[2] and rep["gate"]["passed"]
    assert rep["candidate"]["quantization"]["trials"][0]["calibrator"] == "percentile"  # judged on val
    assert rep["figures"]["pr"]["fp32"]["ground_truth"] > 0 and rep["figures"]["output_error"]["outputs"]
    _, tags = calibration_input(mlflow_server.uri, rep["registered"]["run_id"])
    assert tags["samples"] == "96" and "first 8" in tags["profile"]
