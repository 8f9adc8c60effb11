"""evaluate and gate: measure a candidate against its parent, then judge it.

Q/DQ models are evaluated in Q/DQ semantics (ORT_ENABLE_BASIC: each
DequantizeLinear feeds a float op, which is what TensorRT's int8 math
approximates). The accuracy of ORT's fused int8 CPU kernels is reported too, on a
sample of the test images, labelled as such, and never gates (docs/design.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.onnx_runtime import (BatchTimer, SqnrAccumulator, evaluation_batch, make_session,
                                                     run_side_by_side, sample_rows, sqnr_db)
from edgeslim.components.common.accuracy import top1_percent  # noqa: F401  (re-exported)
from edgeslim.components.common.confidence import drop_check, top1_drop
from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError
from edgeslim.components.common.output_error import OutputError, reference_onnx
from edgeslim.components.recipe import AccuracyGateConfig, EvaluateConfig
from edgeslim.components.common.result import GateCheck, StageResult, verdict


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (share) and SQNR (dB) of candidate outputs against the parent's."""
    return {
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "sqnr_db": round(sqnr_db(reference, candidate), 3),
    }


def flat_logits(outputs: list[np.ndarray]) -> np.ndarray:
    """A model's outputs on a batch as ``(n, k)``: one output as it is, several flattened and joined (as
    :func:`run_batched` joins them)."""
    return outputs[0] if len(outputs) == 1 else np.concatenate([o.reshape(len(o), -1) for o in outputs], 1)


class StreamedTop1:
    """Models compared over a split streamed a batch at a time: each model's top-1 prediction per image
    (one int per image and model: the per-image record), and the SQNR of named pairs of models, whose
    signal and noise powers are summed as the batches come. No model's outputs over the split are held.

    Args:
        models: the models' keys.
        n: images in the split.
        pairs: ``(reference, candidate)`` keys whose SQNR is summed.
    """

    def __init__(self, models: Sequence[str], n: int, pairs: Sequence[tuple[str, str]] = ()):
        self.pred = {m: np.full(n, -1, np.int64) for m in models}
        self.sqnr = {p: SqnrAccumulator() for p in pairs}
        self.classes = 0

    def add(self, start: int, logits: dict[str, np.ndarray], rows: dict[str, np.ndarray] | None = None) -> None:
        """One batch's ``(n, k)`` logits per model; ``start``: the batch's first row in the split; ``rows``:
        per model run on some of the batch's rows alone, their indices in the split."""
        for m, out in logits.items():
            if rows and m in rows:
                self.pred[m][rows[m]] = out.argmax(1)
            else:
                self.pred[m][start:start + len(out)] = out.argmax(1)
            self.classes = int(out.shape[1])
        for (ref, cand), acc in self.sqnr.items():
            acc.add(logits[ref], logits[cand])

    def top1(self, model: str, labels: np.ndarray, rows: np.ndarray | None = None) -> float:
        """Share of images (``rows`` of the split alone, when given) whose top-1 is the label, in percent."""
        if rows is None:
            return float((self.pred[model] == np.asarray(labels)).mean() * 100.0)
        return float((self.pred[model][rows] == np.asarray(labels)[rows]).mean() * 100.0) if len(rows) else 0.0

    def agreement(self, reference: str, candidate: str) -> float:
        """Share of images on which both models' top-1 agree."""
        return float((self.pred[reference] == self.pred[candidate]).mean())

    def sqnr_db(self, reference: str, candidate: str) -> float:
        return self.sqnr[(reference, candidate)].db()


# Above this many classes the confusion matrix is left out of the evaluation (and of KFP's
# ClassificationMetrics): it would outweigh everything else and no UI shows it readably.
MAX_CONFUSION_CLASSES = 100


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, classes: int) -> list[list[int]] | None:
    """Rows: true class, columns: predicted class (top-1 ``pred`` of ``classes``), over the test split;
    None past :data:`MAX_CONFUSION_CLASSES` classes."""
    k = int(classes)
    if not 0 < k <= MAX_CONFUSION_CLASSES:
        return None
    y = np.asarray(labels, np.int64)
    if len(y) and (y.min() < 0 or y.max() >= k):  # labels the logits cannot name: no matrix to draw
        return None
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (y, np.asarray(pred, np.int64)), 1)
    return m.tolist()


def _rejects(paths: Sequence[str | Path], x):
    """The one line for a model that refuses the test inputs (``on_error`` of :func:`run_side_by_side`)."""
    def error(k: int, rows: np.ndarray, exc: Exception) -> DataError:
        return DataError(f"{Path(paths[k]).name} rejects test inputs of shape {list(x.shape)} "
                         f"({str(exc).splitlines()[0][:140]}); give data whose x arrays match the model's input")
    return error


def evaluate(candidate_onnx: str | Path, config: EvaluateConfig, *, parent_onnx: str | Path,
             data: Splits, student_onnx: str | Path | None = None) -> StageResult:
    """Evaluate the candidate and its parent side by side on the test split.

    One pass over the split: each batch, as it is read (decoded, for an image split), runs through every
    model compared: the parent, the candidate (Q/DQ semantics) and the student where there is one, and, on
    ``config.cpu_int8_kernel_samples`` images spread over the split, the candidate on ORT's fused int8 CPU
    kernels. Figures are summed per batch (top-1 per image, SQNR, the output error the report charts), so
    memory follows the batch, not the split. The parent's and the candidate's latency is timed on those
    same runs (:class:`~edgeslim.components.common.onnx_runtime.BatchTimer`).

    Args:
        candidate_onnx: the int8 Q/DQ ONNX.
        config: latency settings, and the images of the fused-kernel figure.
        parent_onnx: the fp32 ONNX of the registered parent model.
        data: the test split is used.
        student_onnx: the fp32 ONNX the candidate was quantized from, when distill or
            prune made a new model. ``fidelity.quantization_sqnr_db`` is measured
            against it: a distilled student is never close to its teacher's logits
            (~10 dB), so SQNR against the parent would judge distillation, not int8.

    Returns:
        ``StageResult`` whose metrics hold ``source`` and ``candidate`` sections
        (metric = top-1 %, fidelity, size, latency; the candidate's fused-kernel figure, its images and its
        Q/DQ figure on them), ``figures`` (the int8 output error against its own fp32 model, for the
        report's chart) and ``confidence``: the top-1 drop's statistic over the test images
        (:func:`~edgeslim.components.common.confidence.top1_drop`).
    """
    t0 = time.perf_counter()
    ref_path, reference = reference_onnx(parent_onnx=parent_onnx, student_onnx=student_onnx)
    own_student = ref_path != Path(parent_onnx)
    x, y = data.x_test, data.y_test
    fused_rows = sample_rows(len(x), config.cpu_int8_kernel_samples)
    paths = {"source": parent_onnx, "candidate": candidate_onnx,
             **({"fused": candidate_onnx} if len(fused_rows) else {}), **({"student": ref_path} if own_student else {})}
    sessions = {k: make_session(p, basic=False if k == "fused" else None, threads=config.threads, side_by_side=True)
                for k, p in paths.items()}
    keys = list(sessions)
    ref = "student" if own_student else "source"
    top1s = StreamedTop1(keys, len(x), pairs=[("source", "candidate"), *([(ref, "candidate")] if own_student else [])])
    err, names = OutputError(), [o.name for o in sessions[ref].get_outputs()]
    timer = BatchTimer([keys.index("source"), keys.index("candidate")], config.latency_batches,
                       config.latency_warmup, config.latency_repeats)
    only = {keys.index("fused"): fused_rows} if "fused" in sessions else {}
    chart_error = None
    for start, rows, outs in run_side_by_side(list(sessions.values()), x, evaluation_batch(config.latency_batches),
                                           on_error=_rejects(list(paths.values()), x), timer=timer, only=only):
        raw = {k: v for k, v in zip(keys, outs) if v is not None}
        part = {"fused": fused_rows[(fused_rows >= start) & (fused_rows < start + len(rows))]}
        top1s.add(start, {k: flat_logits(v) for k, v in raw.items()}, rows=part)
        if chart_error is None:
            try:  # a chart must not cost the evaluation: the report says what went wrong
                err.add((raw[ref], names), (raw["candidate"], names))
            except Exception as exc:
                chart_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def side(key: str) -> dict[str, Any]:
        return {"metric": round(top1s.top1(key, y), 4), "size_bytes": Path(paths[key]).stat().st_size,
                "latency_ms": timer.result(keys.index(key), sessions[key])}

    fid = {"top1_agreement": top1s.agreement("source", "candidate"),
           "sqnr_db": round(top1s.sqnr_db("source", "candidate"), 3)}
    fid["quantization_sqnr_db"] = round(top1s.sqnr_db(ref, "candidate"), 3) if own_student else fid["sqnr_db"]
    metrics = {
        "metric_name": "top1",
        "test_samples": int(len(x)),
        "source": side("source"),
        "candidate": {**side("candidate"), "fidelity": fid},
    }
    if "fused" in sessions:
        metrics["candidate"].update(cpu_int8_kernel_metric=round(top1s.top1("fused", y, fused_rows), 4),
                                    cpu_int8_kernel_samples=int(len(fused_rows)),
                                    cpu_int8_kernel_qdq_metric=round(top1s.top1("candidate", y, fused_rows), 4))
    metrics["confidence"] = {"metric_drop": paired_top1(top1s.pred["source"], top1s.pred["candidate"], y)}
    for section, key in (("source", "source"), ("candidate", "candidate")):
        cm = confusion_matrix(top1s.pred[key], y, top1s.classes)
        if cm is not None:
            metrics[section]["confusion_matrix"] = cm
    metrics["candidate"]["size_ratio"] = round(metrics["source"]["size_bytes"] / metrics["candidate"]["size_bytes"], 3)
    metrics["figures"] = {"error": chart_error} if chart_error else {"output_error": err.result(reference)}
    return StageResult(model=Path(candidate_onnx), metrics=metrics, seconds=time.perf_counter() - t0)


def paired_top1(parent_pred: np.ndarray, candidate_pred: np.ndarray, labels) -> dict[str, Any]:
    """The top-1 drop's statistic from each image's top-1 class under the parent and the candidate: each
    image right or wrong under both."""
    y = np.asarray(labels)
    return top1_drop(np.asarray(parent_pred) == y, np.asarray(candidate_pred) == y)


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
