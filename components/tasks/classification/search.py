"""The classifier's strategy for the accuracy-aware search (:func:`edgeslim.components.quantize.search.search`):
top-1 drop, top-1 agreement and SQNR against the parent's outputs on the validation split, judged by the
recipe's gate; the fallback keeps the most sensitive single layers in float; QAT is the classifier QAT chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common.data import Splits
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, OnnxExportConfig
from edgeslim.components.quantize.search import Strategy, search
from edgeslim.components.recipe import AccuracyGateConfig


class ClassifierStrategy(Strategy):
    """Top-1 drop, top-1 agreement and SQNR against the parent's outputs (the recipe's gate);
    the fallback keeps the most sensitive single layers, or an output's whole tail where it is
    more than its last layer (:mod:`edgeslim.components.quantize.sensitivity`), in float."""

    task = "classification"
    fields = ("metric", "metric_drop", "top1_agreement", "sqnr_db")

    def __init__(self, parent_onnx: str | Path, gate: AccuracyGateConfig, *, model=None,
                 export_config: OnnxExportConfig | None = None):
        self.parent_onnx, self.gate, self.model, self.export_config = parent_onnx, gate, model, export_config
        self.table: dict[str, Any] | None = None
        self.files: dict[str, Path] = {}

    def reference(self, data: Splits) -> dict[str, Any]:
        from edgeslim.components.common.onnx_runtime import make_session, run_side_by_side
        from edgeslim.components.tasks.classification.evaluate import StreamedTop1, flat_logits

        self.parent_session = make_session(self.parent_onnx, basic=None, side_by_side=True)
        top1s = StreamedTop1(["parent"], len(data.x_val))
        for start, _, (out,) in run_side_by_side([self.parent_session], data.x_val):
            top1s.add(start, {"parent": flat_logits(out)})
        self.parent_metric = top1s.top1("parent", data.y_val)
        return {"parent_metric": self.parent_metric}

    def judge(self, candidate: str | Path, data: Splits) -> dict[str, Any]:
        """The candidate and the parent on each validation batch as it is read (one read of every image,
        no outputs over the split held): top-1, agreement and SQNR, judged by the gate, with the top-1
        drop's paired statistic over the validation images."""
        from edgeslim.components.common.confidence import drop_intervals
        from edgeslim.components.common.onnx_runtime import make_session, run_side_by_side
        from edgeslim.components.tasks.classification.evaluate import StreamedTop1, flat_logits, gate, paired_top1

        top1s = StreamedTop1(["parent", "candidate"], len(data.x_val), pairs=[("parent", "candidate")])
        sessions = [self.parent_session, make_session(candidate, basic=None, side_by_side=True)]
        for start, _, (ref, out) in run_side_by_side(sessions, data.x_val):
            top1s.add(start, {"parent": flat_logits(ref), "candidate": flat_logits(out)})
        fid = {"top1_agreement": top1s.agreement("parent", "candidate"),
               "sqnr_db": round(top1s.sqnr_db("parent", "candidate"), 3)}
        stats = {"metric_drop": paired_top1(top1s.pred["parent"], top1s.pred["candidate"], data.y_val)}
        metrics = {"source": {"metric": self.parent_metric}, "confidence": stats,
                   "candidate": {"metric": top1s.top1("candidate", data.y_val), "fidelity": fid}}
        verdict = gate(metrics, self.gate)
        return {"metric": round(metrics["candidate"]["metric"], 4),
                "metric_drop": round(self.parent_metric - metrics["candidate"]["metric"], 4),
                **fid, "passed": verdict["passed"], "outcome": verdict["outcome"], "gate": verdict["summary"],
                "intervals": drop_intervals(stats, {"metric_drop": self.gate.max_metric_drop}, self.gate.confidence)}

    def key(self, row: dict[str, Any]) -> tuple:
        # a trial the gate could not decide ranks above one it refused beyond the noise
        return row.get("outcome") != "refused", row["metric"], row["sqnr_db"]

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned):
        from edgeslim.components.quantize.sensitivity import layer_sensitivity, rank, write

        # on val (layer_sensitivity's default split); it calibrates its pre-processed graph itself
        self.table = layer_sensitivity(fp32_onnx, config.ptq(calibrator), data=data,
                                       work_dir=out_dir / "sensitivity" / "layers", tails=True)
        self.files = write(self.table, out_dir / "sensitivity")
        row = {r["node"]: r for r in self.table["layers"]}
        return [{"label": row[n]["layer"], "nodes": row[n]["nodes"]} for n in rank(self.table, config.sensitivity_metric)
                if not set(row[n]["nodes"]) <= set(pinned)]

    def log_ranking(self, client, run_id):
        from edgeslim.components.quantize.sensitivity import log_to_mlflow

        log_to_mlflow(self.table, self.files, client, run_id)

    def train_qat(self, fp32_onnx, config, *, data, out_dir, progress=None):
        from edgeslim.components.quantize.qat import qat

        return qat(self.model, config, data=data, out_dir=out_dir, fp32_onnx=fp32_onnx,
                   export_config=self.export_config, progress=progress)

    def qat_row(self, res):
        return {"fake_quant_top1_test": res.metrics["fake_quant_top1_test"]}

    def figures(self, row):
        return f"top-1 {row['metric']:.2f}% vs parent {self.parent_metric:.2f}%"

    def fix(self, config, qat_ran):
        # QAT was asked for but could not run: say why first, it is what the user changes
        skipped = f"QAT could not run ({self.qat_skipped}); " if config.qat and not qat_ran and self.qat_skipped else ""
        if config.max_float_layers == 0:
            return (skipped + "quantize.max_float_layers is 0, so no layer could fall back to float: raise it "
                    "(e.g. 3)" + ("" if config.qat else " or set quantize.qat: true") + ", or loosen the gate")
        if not config.qat:
            return "set quantize.qat: true, raise quantize.max_float_layers, or loosen the gate"
        if skipped:
            return skipped + "raise quantize.max_float_layers, or loosen the gate"
        return "raise quantize.max_float_layers or quantize.qat_epochs, or loosen the gate"

    def result_metrics(self, row, res):
        return {"sensitivity_files": {k: str(v) for k, v in self.files.items()}}


def quantize_auto(model, fp32_onnx_path: str | Path, config: AccuracyAwareQuantizeConfig, *,
                  data: Splits, parent_onnx_path: str | Path, gate: AccuracyGateConfig,
                  out_dir: str | Path, tracking_uri: str | None = None,
                  parent_run_id: str | None = None, export_config: OnnxExportConfig | None = None,
                  progress: Callable[[str], None] | None = None) -> StageResult:
    """Find the first int8 classifier that passes ``gate`` on the validation split: PTQ per
    calibrator, then float fallback of the most sensitive layers, then QAT (:func:`search`).

    Args:
        model: the fp32 torch model ``fp32_onnx_path`` was exported from (QAT trains it).
        fp32_onnx_path: the model to quantize.
        config: calibrators, fallback limit, QAT settings.
        data: calibration and QAT from train; sensitivity and every trial judged on val.
        parent_onnx_path: the fp32 ONNX of the registered parent, what the gate compares to.
        gate: the accuracy gate of the recipe.
        out_dir: one folder per trial, ``autotune.json``, the sensitivity table and chart.
        tracking_uri: MLflow server of the parent run (default: the active/env one).
        parent_run_id: every trial becomes a child run of it (default: ``$MLFLOW_RUN_ID``
            or the active run; no MLflow logging without one).
        export_config: ONNX export settings for QAT.
        progress: called with one line per trial.

    Returns:
        StageResult whose model is the winning Q/DQ ONNX; metrics hold ``trials``
        (one row each), ``winner``, ``reason``, ``sensitivity`` and ``sensitivity_files``.

    Raises:
        GateRejected: no trial passed; the message names the best one and what to change.
    """
    strategy = ClassifierStrategy(parent_onnx_path, gate, model=model, export_config=export_config)
    return search(fp32_onnx_path, config, strategy=strategy, data=data, out_dir=out_dir,
                  tracking_uri=tracking_uri, parent_run_id=parent_run_id, progress=progress)
