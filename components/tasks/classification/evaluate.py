"""evaluate and gate: measure a candidate against its parent, then judge it.

Q/DQ models are evaluated in Q/DQ semantics (ORT_ENABLE_BASIC: each
DequantizeLinear feeds a float op, which is what TensorRT's int8 math
approximates). The accuracy of ORT's fused int8 CPU kernels is reported too,
labelled as such, and never gates (docs/design.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.components.common.onnx_runtime import latency_ms, run_batched, sqnr_db  # noqa: F401  (re-exported)
from edgeslim.components.common.accuracy import top1_percent  # noqa: F401  (re-exported)
from edgeslim.components.common.confidence import drop_check, top1_drop
from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError
from edgeslim.components.recipe import AccuracyGateConfig, EvaluateConfig
from edgeslim.components.common.result import GateCheck, StageResult, verdict
from edgeslim.components.export import make_session


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (share) and SQNR (dB) of candidate outputs against the parent's."""
    return {
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "sqnr_db": round(sqnr_db(reference, candidate), 3),
    }


def measure(onnx_path: str | Path, data: Splits, config: EvaluateConfig) -> dict[str, Any]:
    """Outputs on the test split, top-1, size and latencies of one ONNX model."""
    sess = make_session(onnx_path, basic=True, threads=config.threads)
    try:
        out = run_batched(sess, data.x_test)
    except Exception as exc:  # ORT raises its own types for shape mismatches
        raise DataError(
            f"{Path(onnx_path).name} rejects test inputs of shape {list(data.x_test.shape)} "
            f"({str(exc).splitlines()[0][:140]}); give data whose x arrays match the model's input"
        ) from None
    return {
        "outputs": out,
        "metric": round(top1_percent(out, data.y_test), 4),
        "size_bytes": Path(onnx_path).stat().st_size,
        "latency_ms": {
            f"batch_{b}": latency_ms(sess, data.x_test, b, config.latency_warmup, config.latency_repeats)
            for b in config.latency_batches
        },
    }


# Above this many classes the confusion matrix is left out of the evaluation (and of KFP's
# ClassificationMetrics): it would outweigh everything else and no UI shows it readably.
MAX_CONFUSION_CLASSES = 100


def confusion_matrix(logits: np.ndarray, labels: np.ndarray) -> list[list[int]] | None:
    """Rows: true class, columns: predicted class (top-1), over the test split; None past
    :data:`MAX_CONFUSION_CLASSES` classes."""
    k = int(logits.shape[1]) if logits.ndim == 2 else 0
    if not 0 < k <= MAX_CONFUSION_CLASSES:
        return None
    y = np.asarray(labels, np.int64)
    if len(y) and (y.min() < 0 or y.max() >= k):  # labels the logits cannot name: no matrix to draw
        return None
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (y, logits.argmax(1)), 1)
    return m.tolist()


def evaluate(candidate_onnx: str | Path, config: EvaluateConfig, *, parent_onnx: str | Path,
             data: Splits, student_onnx: str | Path | None = None) -> StageResult:
    """Evaluate the candidate and its parent side by side on the test split.

    Args:
        candidate_onnx: the int8 Q/DQ ONNX.
        config: latency settings.
        parent_onnx: the fp32 ONNX of the registered parent model.
        data: the test split is used.
        student_onnx: the fp32 ONNX the candidate was quantized from, when distill or
            prune made a new model. ``fidelity.quantization_sqnr_db`` is measured
            against it: a distilled student is never close to its teacher's logits
            (~10 dB), so SQNR against the parent would judge distillation, not int8.

    Returns:
        ``StageResult`` whose metrics hold ``source`` and ``candidate`` sections
        (metric = top-1 %, fidelity, size, latency) and ``confidence``: the top-1 drop's statistic over the
        test images (:func:`~edgeslim.components.common.confidence.top1_drop`).
    """
    t0 = time.perf_counter()
    parent = measure(parent_onnx, data, config)
    cand = measure(candidate_onnx, data, config)
    fused = make_session(candidate_onnx, basic=False, threads=config.threads)
    cpu_kernel_metric = top1_percent(run_batched(fused, data.x_test), data.y_test)
    fid = fidelity(parent["outputs"], cand["outputs"])
    if student_onnx is not None and Path(student_onnx).resolve() != Path(parent_onnx).resolve():
        student_out = run_batched(make_session(student_onnx, basic=True, threads=config.threads), data.x_test)
        fid["quantization_sqnr_db"] = round(sqnr_db(student_out, cand["outputs"]), 3)
    else:
        fid["quantization_sqnr_db"] = fid["sqnr_db"]
    metrics = {
        "metric_name": "top1",
        "test_samples": int(len(data.x_test)),
        "source": {k: v for k, v in parent.items() if k != "outputs"},
        "candidate": {
            **{k: v for k, v in cand.items() if k != "outputs"},
            "fidelity": fid,
            "cpu_int8_kernel_metric": round(cpu_kernel_metric, 4),
        },
    }
    metrics["confidence"] = {"metric_drop": paired_top1(parent["outputs"], cand["outputs"], data.y_test)}
    for section, measured in (("source", parent), ("candidate", cand)):
        cm = confusion_matrix(measured["outputs"], data.y_test)
        if cm is not None:
            metrics[section]["confusion_matrix"] = cm
    metrics["candidate"]["size_ratio"] = round(parent["size_bytes"] / cand["size_bytes"], 3)
    return StageResult(model=Path(candidate_onnx), metrics=metrics, seconds=time.perf_counter() - t0)


def paired_top1(parent_logits: np.ndarray, candidate_logits: np.ndarray, labels) -> dict[str, Any]:
    """The top-1 drop's statistic: each image right or wrong under the parent and under the candidate."""
    y = np.asarray(labels)
    return top1_drop(parent_logits.argmax(1) == y, candidate_logits.argmax(1) == y)


def gate(metrics: dict[str, Any], config: AccuracyGateConfig) -> dict[str, Any]:
    """Judge evaluation metrics against the gate; returns ``{passed, outcome, checks, summary}``. With
    ``config.confidence`` the top-1 drop is judged by its interval (``metrics["confidence"]``)."""
    src, cand = metrics["source"], metrics["candidate"]
    drop = round(src["metric"] - cand["metric"], 4)
    fid = cand["fidelity"]
    qsqnr = fid.get("quantization_sqnr_db", fid["sqnr_db"])
    checks = [
        drop_check("metric_drop", drop, config.max_metric_drop,
                   f"top-1 fell {drop:.2f} pt ({src['metric']:.2f} -> {cand['metric']:.2f}); "
                   f"allowed {config.max_metric_drop:.2f}",
                   stat=(metrics.get("confidence") or {}).get("metric_drop"), level=config.confidence),
        GateCheck("top1_agreement", fid["top1_agreement"], config.min_top1_agreement,
                  fid["top1_agreement"] >= config.min_top1_agreement,
                  f"top-1 agreement with the parent {fid['top1_agreement']:.4f}; "
                  f"required {config.min_top1_agreement:.4f}"),
        GateCheck("sqnr_db", qsqnr, config.min_sqnr_db, qsqnr >= config.min_sqnr_db,
                  f"int8 output SQNR {qsqnr:.2f} dB against its fp32 model; required {config.min_sqnr_db:.2f} dB"),
    ]
    return verdict(checks)
