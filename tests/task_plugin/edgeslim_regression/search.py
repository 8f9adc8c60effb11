"""The regressor's strategy for edgeslim's accuracy-aware search: trials judged by the task's gate (MAE
increase and output SQNR against the fp32 model) on the validation split. No fallback groups are
ranked and there is no QAT twin: it keeps the base `train_qat`, so the search skips QAT and says why."""

from __future__ import annotations

from typing import Any

from edgeslim.components.common.onnx_runtime import sqnr_db
from edgeslim.components.quantize.search import Strategy

from edgeslim_regression.evaluate import gate, predictions, scores


class RegressionStrategy(Strategy):
    task = "regression"
    candidate = "regression candidate"
    gate_name = "regression gate"
    fields = ("metric", "mae", "mae_increase", "sqnr_db")

    def __init__(self, fp32_onnx, task_config, *, model=None):
        self.fp32_onnx, self.task_config, self.model = fp32_onnx, task_config, model

    def reference(self, data) -> dict[str, Any]:
        self.fp32 = predictions(self.fp32_onnx, data.x_val)
        self.parent = scores(self.fp32, data.y_val, self.task_config.tolerance)
        return {"parent_mae": self.parent["mae"], "parent_metric": self.parent["within"]}

    def judge(self, candidate, data) -> dict[str, Any]:
        pred = predictions(candidate, data.x_val)
        s = scores(pred, data.y_val, self.task_config.tolerance)
        sqnr = round(sqnr_db(self.fp32, pred), 3)
        metrics = {"source": {"regression": {"mae": self.parent["mae"]}},
                   "candidate": {"regression": {"mae": s["mae"]}, "fidelity": {"sqnr_db": sqnr}}}
        v = gate(metrics, self.task_config.gate)
        return {"metric": s["within"], "mae": s["mae"], "mae_increase": round(s["mae"] - self.parent["mae"], 5),
                "sqnr_db": sqnr, "passed": v["passed"], "gate": v["summary"]}

    def key(self, row: dict[str, Any]) -> tuple:
        return row["passed"], -row["mae"], row["sqnr_db"]

    def figures(self, row: dict[str, Any]) -> str:
        return f"MAE {row['mae']:.4f} vs fp32 {self.parent['mae']:.4f}, SQNR {row['sqnr_db']:.1f} dB"

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned) -> list[dict[str, Any]]:
        self.table = []
        return []  # nothing to keep in float: PTQ per calibrator is the whole search

    def fix(self, config, qat_ran: bool) -> str:
        skipped = f"QAT could not run ({self.qat_skipped}); " if config.qat and self.qat_skipped else ""
        return skipped + "try another calibrator, or loosen task.gate"
