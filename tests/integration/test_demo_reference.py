"""The demos' reference models: trained, logged and registered once, reused after (real `mlflow server`)."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.slow

# label -> (function, run name, metrics logged, what follows "@ALIAS" on the "registered" line)
CASES = {
    "teacher": ("edgeslim.pipelines.demo:ensure_teacher", "digits-teacher", {"val_top1", "test_top1"}, ""),
    "detector": ("edgeslim.pipelines.demo_detect:ensure_detector", "digits-detector",
                 {"test_map50", "test_map50_95", "test_mean_tp_score", "test_recall"}, " (test mAP@0.5 "),
}


@pytest.mark.parametrize("label", list(CASES))
def test_reference_model_is_registered_once_then_reused(mlflow_server, label):
    from edgeslim.components.common.tracking import connect

    target, run_name, metrics, note = CASES[label]
    module, func = target.split(":")
    ensure = getattr(importlib.import_module(module), func)
    name, kw = f"it-{label}", {"epochs": 1, "name": f"it-{label}", "alias": "best", "experiment": "it-reference"}
    client = connect(mlflow_server.uri)

    lines: list[str] = []
    assert ensure(client, progress=lines.append, **kw) == "1"
    assert lines[0].startswith(f"{label}: training epoch 1/1 (loss ")
    assert lines[-1].startswith(f"{label}: registered {name} version 1 @best{note}")
    assert note or lines[-1].endswith("@best")
    run = client.get_run(client.get_model_version(name, "1").run_id)
    assert run.info.run_name == run_name
    assert run.data.params["epochs"] == "1" and run.data.params["seed"] == "0"
    assert set(run.data.metrics) == metrics
    assert client.get_experiment(run.info.experiment_id).name == "it-reference"
    assert client.get_registered_model(name).aliases == {"best": "1"}

    again: list[str] = []
    assert ensure(client, progress=again.append, **kw) == "1"
    assert again == [f"{label}: reusing {name} version 1 @best"]
