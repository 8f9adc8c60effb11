"""Accuracy-aware quantization: the cheapest int8 candidate that passes the gate.

Trials, in order, stopping at the first that passes:

1. PTQ with each configured calibrator;
2. the best calibrator with the most sensitive layers kept in float, one more
   per trial, up to ``max_float_layers`` (ranked by :mod:`.sensitivity`);
3. QAT from the best candidate so far.

Each trial is judged by the same gate as the final candidate (top-1 drop,
top-1 agreement and SQNR against the parent, on the test split). Every trial
is a row of ``autotune.json`` (and of the report) and, when an MLflow run is
given or active, a child run of it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import GateRejected
from edgeslim.components.recipe import AccuracyGateConfig
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, OnnxExportConfig, QATQuantizeConfig

log = logging.getLogger(__name__)


class _Tracker:
    """Child runs under a parent MLflow run, or nothing when there is no run."""

    def __init__(self, tracking_uri: str | None, parent_run_id: str | None):
        self.client = None
        self.parent = None
        run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID")
        if not run_id:
            try:
                import mlflow

                active = mlflow.active_run()
                run_id = active.info.run_id if active else None
                tracking_uri = tracking_uri or mlflow.get_tracking_uri()
            except ImportError:
                run_id = None
        if not run_id:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()
        self.parent = self.client.get_run(run_id)

    def trial(self, row: dict[str, Any]) -> str | None:
        if not self.client:
            return None
        run = self.client.create_run(
            self.parent.info.experiment_id,
            run_name=f"trial-{row['trial']}-{row['kind']}",
            tags={"mlflow.parentRunId": self.parent.info.run_id, "edgeslim.trial": str(row["trial"]),
                  "edgeslim.trial_kind": row["kind"], "edgeslim.gate_passed": str(row["passed"])},
        )
        rid = run.info.run_id
        self.client.log_param(rid, "calibrator", row["calibrator"])
        self.client.log_param(rid, "float_layers", ",".join(row["float_layers"]) or "-")
        self.client.log_param(rid, "kind", row["kind"])
        for k in ("metric", "metric_drop", "top1_agreement", "sqnr_db", "size_bytes"):
            if isinstance(row.get(k), (int, float)) and np.isfinite(row[k]):
                self.client.log_metric(rid, k, float(row[k]))
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def sensitivity(self, table: dict[str, Any], paths: dict[str, Path]) -> None:
        if self.client:
            from edgeslim.components.quantize.sensitivity import log_to_mlflow

            log_to_mlflow(table, paths, self.client, self.parent.info.run_id)


def _judge(candidate: Path, parent_out: np.ndarray, parent_metric: float, data: Splits,
           gate_cfg: AccuracyGateConfig) -> dict[str, Any]:
    from edgeslim.components.evaluate import fidelity, gate, top1_percent
    from edgeslim.components.quantize.sensitivity import _scores

    out = _scores(candidate, data.x_test)
    metrics = {"source": {"metric": parent_metric},
               "candidate": {"metric": top1_percent(out, data.y_test), "fidelity": fidelity(parent_out, out)}}
    verdict = gate(metrics, gate_cfg)
    return {"metric": round(metrics["candidate"]["metric"], 4),
            "metric_drop": round(parent_metric - metrics["candidate"]["metric"], 4),
            **metrics["candidate"]["fidelity"], "passed": verdict["passed"], "gate": verdict["summary"]}


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is None or (a["metric"], a["sqnr_db"]) > (b["metric"], b["sqnr_db"])


def quantize_auto(model, fp32_onnx_path: str | Path, config: AccuracyAwareQuantizeConfig, *,
                  data: Splits, parent_onnx_path: str | Path, gate: AccuracyGateConfig,
                  out_dir: str | Path, tracking_uri: str | None = None,
                  parent_run_id: str | None = None, export_config: OnnxExportConfig | None = None,
                  progress: Callable[[str], None] | None = None) -> StageResult:
    """Find the first int8 candidate that passes ``gate``: PTQ per calibrator, then float
    fallback of the most sensitive layers, then QAT.

    Args:
        model: the fp32 torch model ``fp32_onnx_path`` was exported from (QAT trains it).
        fp32_onnx_path: the model to quantize.
        config: calibrators, fallback limit, QAT settings.
        data: calibration and QAT from train, sensitivity on val, gate on test.
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
        (one row each), ``winner`` and ``reason``.

    Raises:
        GateRejected: no trial passed; the message names the best one and what to change.
    """
    from edgeslim.components.evaluate import top1_percent
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize
    from edgeslim.components.quantize.sensitivity import _scores, layer_sensitivity, rank, write

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = _Tracker(tracking_uri, parent_run_id)
    parent_out = _scores(parent_onnx_path, data.x_test)
    parent_metric = top1_percent(parent_out, data.y_test)
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    sens_table: dict[str, Any] | None = None
    sens_files: dict[str, str] = {}

    def record(kind: str, calibrator: str, float_layers: list[str], path: Path, seconds: float,
               extra: dict | None = None) -> dict[str, Any]:
        nonlocal best
        row = {"trial": len(trials) + 1, "kind": kind, "calibrator": calibrator,
               "float_layers": list(float_layers), "model": str(path),
               "size_bytes": path.stat().st_size, "seconds": round(seconds, 2),
               **_judge(path, parent_out, parent_metric, data, gate), **(extra or {})}
        row["mlflow_run_id"] = tracker.trial(row)
        trials.append(row)
        if _better(row, best):
            best = row
        if progress:
            progress(f"trial {row['trial']} {kind} {calibrator} float={len(float_layers)}: "
                     f"top-1 {row['metric']:.2f}% ({'pass' if row['passed'] else 'fail'})")
        return row

    def finish(winner: dict[str, Any], reason: str) -> StageResult:
        report = {"trials": trials, "winner": winner["trial"], "reason": reason,
                  "parent_metric": parent_metric, "sensitivity": sens_table}
        (out_dir / "autotune.json").write_text(json.dumps(report, indent=1, default=str))
        final = out_dir / "model.int8.onnx"
        final.write_bytes(Path(winner["model"]).read_bytes())
        metrics = {"size_bytes": final.stat().st_size, "winner": winner, "reason": reason,
                   "trials": trials, "sensitivity": sens_table, "sensitivity_files": sens_files}
        lineage = {"stage": "quantize", "method": "auto", "config": config.to_json_dict(),
                   "winning_trial": winner["trial"], "calibration_split": "train",
                   "data_digest": data.digest()}
        return StageResult(final, metrics, lineage, time.perf_counter() - start)

    # 1. PTQ with each calibrator (plus the recipe's pinned float layers).
    ranges: dict[str, dict[str, float]] = {}
    for cal in config.calibrators:
        t = time.perf_counter()
        ranges[cal] = calibrate_onnx(fp32_onnx_path, config.ptq(cal), data)
        res = quantize(fp32_onnx_path, config.ptq(cal), data=data, out_dir=out_dir / f"ptq-{cal}",
                       ranges=ranges[cal])
        pinned = list(res.metrics["float_layers"])
        row = record("ptq", cal, pinned, Path(res.model), time.perf_counter() - t)
        if row["passed"]:
            return finish(row, f"trial {row['trial']}: plain PTQ with the {cal} calibrator passed the "
                               f"gate first ({row['gate']})")
    best_cal = best["calibrator"]  # type: ignore[index]

    # 2. Keep the most sensitive layers in float, one more per trial.
    if config.max_float_layers > 0:
        sens_table = layer_sensitivity(fp32_onnx_path, config.ptq(best_cal), data=data,
                                       work_dir=out_dir / "sensitivity" / "layers")
        written = write(sens_table, out_dir / "sensitivity")
        sens_files.update({k: str(v) for k, v in written.items()})
        tracker.sensitivity(sens_table, written)
        ranked = [n for n in rank(sens_table, config.sensitivity_metric) if n not in pinned]
        for k in range(1, min(config.max_float_layers, len(ranked)) + 1):
            keep = ranked[:k]
            t = time.perf_counter()
            res = quantize(fp32_onnx_path, config.ptq(best_cal, keep), data=data,
                           out_dir=out_dir / f"fallback-{k}", ranges=ranges[best_cal])
            row = record("fallback", best_cal, res.metrics["float_layers"], Path(res.model),
                         time.perf_counter() - t)
            if row["passed"]:
                names = [r["layer"] for r in sens_table["layers"] if r["node"] in keep]
                return finish(row, f"trial {row['trial']}: PTQ ({best_cal}) failed the gate; keeping the "
                                   f"{k} most sensitive layer(s) {names} in float passed ({row['gate']})")

    # 3. QAT from the best candidate so far.
    if config.qat:
        float_layers = list(best["float_layers"])  # type: ignore[index]
        qcfg = QATQuantizeConfig(calibrator=best_cal, num_samples=config.num_samples,  # type: ignore[arg-type]
                                 percentile=config.percentile, num_bins=config.num_bins,
                                 float_layers=float_layers, epochs=config.qat_epochs,
                                 lr=config.qat_lr, seed=config.seed)
        from edgeslim.components.quantize.qat import qat

        t = time.perf_counter()
        res = qat(model, qcfg, data=data, out_dir=out_dir / "qat", fp32_onnx=fp32_onnx_path,
                  export_config=export_config)
        row = record("qat", best_cal, float_layers, Path(res.model), time.perf_counter() - t,
                     {"fake_quant_top1_test": res.metrics["fake_quant_top1_test"]})
        if row["passed"]:
            return finish(row, f"trial {row['trial']}: PTQ and float fallback failed the gate; "
                               f"{config.qat_epochs} epoch(s) of QAT from {best_cal} passed ({row['gate']})")

    (out_dir / "autotune.json").write_text(json.dumps(
        {"trials": trials, "winner": None, "parent_metric": parent_metric, "sensitivity": sens_table},
        indent=1, default=str))
    b = best  # type: ignore[assignment]
    tried = f"{len(trials)} trial(s)"
    if config.max_float_layers == 0:
        fix = ("quantize.max_float_layers is 0, so no layer could fall back to float: raise it "
               "(e.g. 3)" + ("" if config.qat else " or set quantize.qat: true")
               + ", or loosen the gate")
    elif not config.qat:
        fix = "set quantize.qat: true, raise quantize.max_float_layers, or loosen the gate"
    else:
        fix = "raise quantize.max_float_layers or quantize.qat_epochs, or loosen the gate"
    raise GateRejected(
        f"quantize(auto): no candidate passed the gate after {tried}; best was trial {b['trial']} "
        f"({b['kind']}, {b['calibrator']}, top-1 {b['metric']:.2f}% vs parent {parent_metric:.2f}%: "
        f"{b['gate']}); {fix}"
    )
