"""Evaluate and gate a regressor: the candidate beside its parent on the test split.

The task metric is the share of test samples predicted within ``task.tolerance`` of their label (%);
the regression section holds the mean absolute error, which the gate judges with the output SQNR.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.components.common.onnx_runtime import latency_ms, make_session, run_batched, sqnr_db
from edgeslim.components.common.result import GateCheck, StageResult, verdict


def scores(y_pred: np.ndarray, y_true: np.ndarray, tolerance: float) -> dict[str, float]:
    """MAE and the share within ``tolerance`` (%), of predicted values against labels."""
    err = np.abs(np.asarray(y_pred, np.float64).reshape(-1) - np.asarray(y_true, np.float64).reshape(-1))
    return {"mae": round(float(err.mean()), 5) if err.size else 0.0,
            "within": round(100.0 * float((err <= tolerance).mean()), 4) if err.size else 0.0}


def predictions(onnx_path: str | Path, x: np.ndarray, threads: int = 0) -> np.ndarray:
    """The model's predicted value per sample, in Q/DQ semantics."""
    return run_batched(make_session(onnx_path, basic=True, threads=threads), x).reshape(len(x), -1)[:, 0]


def _measure(onnx_path, data, config, tolerance: float) -> dict[str, Any]:
    sess = make_session(onnx_path, basic=True, threads=config.threads)
    pred = run_batched(sess, data.x_test).reshape(len(data.x_test), -1)[:, 0]
    s = scores(pred, data.y_test, tolerance)
    return {"pred": pred, "metric": s["within"], "regression": {"mae": s["mae"]},
            "size_bytes": Path(onnx_path).stat().st_size,
            "latency_ms": {f"batch_{b}": latency_ms(sess, data.x_test, b, config.latency_warmup,
                                                    config.latency_repeats) for b in config.latency_batches}}


def evaluate(candidate_onnx, config, *, parent_onnx, data, task, student_onnx=None) -> StageResult:
    """``metrics``: ``metric_name``, ``test_samples``, ``source`` and ``candidate`` (metric, regression,
    size, latency; the candidate's fidelity and size ratio)."""
    t0 = time.perf_counter()
    parent = _measure(parent_onnx, data, config, task.tolerance)
    cand = _measure(candidate_onnx, data, config, task.tolerance)
    fp32 = parent["pred"] if student_onnx is None else predictions(student_onnx, data.x_test, config.threads)
    fidelity = {"sqnr_db": round(sqnr_db(parent["pred"], cand["pred"]), 3),
                "quantization_sqnr_db": round(sqnr_db(fp32, cand["pred"]), 3),
                "value_agreement": float((np.rint(parent["pred"]) == np.rint(cand["pred"])).mean())}
    keep = ("metric", "regression", "size_bytes", "latency_ms")
    metrics = {
        "metric_name": "within_tolerance",
        "test_samples": int(len(data.x_test)),
        "source": {k: parent[k] for k in keep},
        "candidate": {**{k: cand[k] for k in keep}, "fidelity": fidelity,
                      "size_ratio": round(parent["size_bytes"] / cand["size_bytes"], 3)},
    }
    return StageResult(model=Path(candidate_onnx), metrics=metrics, seconds=time.perf_counter() - t0)


def gate(metrics: dict[str, Any], config) -> dict[str, Any]:
    """MAE increase and output SQNR against the task's gate: ``{passed, checks, summary}``."""
    s, c = metrics["source"]["regression"], metrics["candidate"]["regression"]
    rise = round(c["mae"] - s["mae"], 5)
    fid = metrics["candidate"]["fidelity"]
    sqnr = fid.get("quantization_sqnr_db", fid["sqnr_db"])
    return verdict([
        GateCheck("mae_increase", rise, config.max_mae_increase, rise <= config.max_mae_increase,
                  f"MAE rose {rise:+.4f} ({s['mae']:.4f} -> {c['mae']:.4f}); allowed {config.max_mae_increase:.4f}"),
        GateCheck("sqnr_db", sqnr, config.min_sqnr_db, sqnr >= config.min_sqnr_db,
                  f"int8 output SQNR {sqnr:.2f} dB against its fp32 model; required {config.min_sqnr_db:.2f} dB"),
    ])
