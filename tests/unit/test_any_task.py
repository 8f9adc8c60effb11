"""What the stages do for a task they were not built around: a strategy without QAT is searched without
it, and the registry records whatever fidelity figures the task's evaluation measured.
(tests/integration/test_task_plugin.py runs a whole third task from outside the repository.)"""

from __future__ import annotations

from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig
from edgeslim.components.quantize.search import Strategy


class _NoQat(Strategy):
    task = "regression"

    def __init__(self, model):
        self.model = model

    def reference(self, data):
        return {}

    def judge(self, candidate, data):
        return {}

    def key(self, row):
        return ()

    def figures(self, row):
        return ""

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned):
        return []

    def fix(self, config, qat_ran):
        return ""


def test_a_strategy_that_keeps_the_base_train_qat_is_searched_without_qat(tmp_path):
    # a torch model is there (the search config asks for QAT by default), but the task has no QAT twin
    s = _NoQat(model=object())
    assert s.qat("m.onnx", AccuracyAwareQuantizeConfig(), data=None, out_dir=tmp_path, calibrator="minmax",
                 float_layers=[]) is None
    assert s.qat_skipped == "the regression task has no QAT"


def test_the_registry_metrics_are_the_fidelity_figures_the_task_measured():
    from edgeslim.components.register import _flat_metrics

    ev = {"source": {"metric": 40.0, "size_bytes": 800, "latency_ms": {"batch_1": 0.2}},
          "candidate": {"metric": 39.5, "size_bytes": 300, "latency_ms": {"batch_1": 0.3}, "size_ratio": 2.7,
                        "fidelity": {"sqnr_db": 31.5, "value_agreement": 0.98}}}
    flat = _flat_metrics(ev)
    assert flat["sqnr_db"] == 31.5 and flat["value_agreement"] == 0.98 and "top1_agreement" not in flat
    assert flat["metric_drop"] == 0.5 and flat["candidate_latency_ms_batch_1"] == 0.3
