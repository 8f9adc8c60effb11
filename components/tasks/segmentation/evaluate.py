"""Segmentation evaluation and the segmentation gate.

The evaluator runs the models side by side a test batch at a time (the split's images and masks are
read once, whatever its size), takes each model's argmax masks (:mod:`.runtime`) and sums a confusion
matrix per model over the split: mIoU (the mean over the classes present in the labels or the
predictions), pixel accuracy and per-class IoU come from it, so memory does not grow with the split.
Label pixels equal to ``task.ignore_index`` count for no class.

The gate judges the mIoU drop, a floor on the worst class's IoU (a class int8 wipes out barely moves
the mean) and the pixel accuracy drop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError
from edgeslim.components.common.onnx_runtime import (BatchTimer, SqnrAccumulator, evaluation_batch, input_rejected,
                                                     make_session, run_side_by_side, sample_rows)
from edgeslim.components.common.result import GateCheck, StageResult, verdict
from edgeslim.components.tasks.segmentation.runtime import argmax_masks, logits_output


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Rows: label class, columns: predicted class, over the pixels of ``gt`` that are a class."""
    gt = np.asarray(gt, np.int64)
    if gt.shape != pred.shape:
        raise DataError(f"masks of shape {list(gt.shape[1:])} but the model's masks are {list(pred.shape[1:])}; "
                        "the label masks must be at the model input's size (data.preprocess resizes both)")
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if (~keep & (gt != ignore_index)).any():
        bad = int(gt[~keep & (gt != ignore_index)].flat[0])
        raise DataError(f"a label mask holds class {bad}, outside 0..{num_classes - 1} and not the ignore_index "
                        f"{ignore_index}; fix the masks or task.num_classes / task.ignore_index")
    idx = gt[keep] * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm: np.ndarray) -> dict[str, Any]:
    """mIoU, pixel accuracy (points) and per-class IoU of a confusion matrix; the worst class among
    those the labels hold."""
    cm = np.asarray(cm, np.float64)
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    labelled = [c for c in range(len(cm)) if gt[c] > 0]
    worst = min(labelled, key=lambda c: iou[c]) if labelled else None
    return {
        "miou": round(float(np.nanmean(iou)) * 100, 4) if present.any() else 0.0,
        "pixel_accuracy": round(float(tp.sum() / max(cm.sum(), 1)) * 100, 4),
        "per_class_iou": {str(c): round(float(iou[c]) * 100, 3) for c in range(len(cm)) if present[c]},
        "worst_class": str(worst) if worst is not None else None,
        "worst_class_iou": round(float(iou[worst]) * 100, 3) if worst is not None else 0.0,
        "pixels": int(cm.sum()),
    }


def side_by_side(onnx_paths: Sequence[str | Path], x, y, *, basic: Sequence[bool | None] | bool | None, batch: int,
                 sessions: Sequence | None = None, timer=None, only: dict[int, np.ndarray] | None = None
                 ) -> Iterator[tuple[int, Any, list[tuple[list[np.ndarray], list[str]] | None]]]:
    """Each batch's first row, its labels and per model its ``(outputs, names)`` on the batch: the models run
    side by side, each batch of ``x`` read once (``x`` and ``y`` may be lazy splits), in Q/DQ semantics where
    ``basic`` says so (per model, or for all; see :func:`make_session`). ``sessions``, ``timer``, ``only``: as
    :func:`~edgeslim.components.common.onnx_runtime.run_side_by_side` takes them (a model in ``only`` has the
    outputs of those of the batch's rows, ``None`` for a batch with none of them)."""
    basics = [basic] * len(onnx_paths) if basic is None or isinstance(basic, bool) else list(basic)
    if sessions is None:
        sessions = [make_session(p, basic=b, side_by_side=True) for p, b in zip(onnx_paths, basics)]
    names = [[o.name for o in s.get_outputs()] for s in sessions]

    def rejects(k: int, rows, exc: Exception) -> DataError:  # ORT raises its own types for shape mismatches
        return input_rejected(onnx_paths[k], x, exc)

    for start, xb, outs in run_side_by_side(sessions, x, batch, on_error=rejects, timer=timer, only=only):
        yield start, y[start:start + len(xb)], [(o, n) if o is not None else None for o, n in zip(outs, names)]


def picked(only: dict[int, np.ndarray] | None, k: int, start: int, n: int) -> np.ndarray | None:
    """The rows of a batch (``start``, ``n`` rows) model ``k`` of ``only`` ran on, within the batch; None
    for a model that ran on every row."""
    if not only or k not in only:
        return None
    return only[k][(only[k] >= start) & (only[k] < start + n)] - start


def segment_batches(onnx_paths: Sequence[str | Path], x, y, task, *, basic: Sequence[bool | None] | bool | None = None,
                    batch: int = 64, on_batch=None, sessions: Sequence | None = None, timer=None,
                    only: dict[int, np.ndarray] | None = None) -> list[np.ndarray]:
    """Confusion matrices of one or more ONNX segmenters on ``x`` against masks ``y``, run side by side a
    batch at a time (``x`` and ``y`` may be lazy splits: each batch is read once).

    Args:
        onnx_paths: the models.
        x: the inputs.
        y: per input a class map (H, W), at the input's size.
        task: the recipe's ``SegmentationTaskConfig``.
        basic: per model (or for all), Q/DQ semantics (see :func:`make_session`).
        batch: images per run.
        on_batch: called with each batch's ``(raw, masks, labels)``: per model ``(outputs, names)``, per
            model the argmax masks, and the label masks.
        sessions, timer, only: as :func:`side_by_side` takes them (a model in ``only`` counts those images
            alone, and has ``None`` in ``on_batch`` for a batch with none of them).

    Returns:
        Per model its ``(num_classes, num_classes)`` confusion matrix.
    """
    k = task.num_classes
    cms = [np.zeros((k, k), np.int64) for _ in onnx_paths]
    for start, labels, raw in side_by_side(onnx_paths, x, y, basic=basic, batch=batch, sessions=sessions,
                                           timer=timer, only=only):
        yb = np.asarray(labels)
        masks = [None if r is None else argmax_masks(logits_output(dict(zip(r[1], r[0])), task), yb.shape[1:])
                 for r in raw]
        for j, (cm, m) in enumerate(zip(cms, masks)):
            if m is not None:
                rows = picked(only, j, start, len(yb))
                cm += confusion(m, yb if rows is None else yb[rows], k, task.ignore_index)
        if on_batch is not None:
            on_batch(raw, masks, yb)
    return cms


def _measured(onnx_path: str | Path, cm: np.ndarray, latency: dict[str, float]) -> dict[str, Any]:
    m = segmentation_metrics(cm)
    return {"metric": m["miou"], "segmentation": m, "size_bytes": Path(onnx_path).stat().st_size,
            "latency_ms": latency}


class PixelAgreement:
    """The share of pixels where two models' masks agree, summed over batches."""

    def __init__(self) -> None:
        self.same = self.total = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.same += int((a == b).sum())
        self.total += int(a.size)

    def share(self) -> float:
        return round(self.same / self.total, 6) if self.total else 1.0


def evaluate_segmentation(candidate_onnx: str | Path, config, *, parent_onnx: str | Path, data: Splits,
                          task, student_onnx: str | Path | None = None) -> StageResult:
    """Evaluate a segmenter candidate and its parent side by side on the test split.

    The parent, the candidate (Q/DQ semantics) and (when distill or prune made one) the fp32 student run on
    each test batch in turn, the candidate on ORT's fused int8 CPU kernels on ``config.cpu_int8_kernel_samples``
    images spread over the split: the split is read once, the logits' SQNR and the masks' agreement are
    summed over batches, and latency is timed on those runs.

    Returns:
        ``StageResult`` whose metrics have the spine's shape (``metric`` = mIoU in points, ``fidelity``,
        size, latency) plus a ``segmentation`` section per model.
    """
    t0 = time.perf_counter()
    own = student_onnx is not None and Path(student_onnx).resolve() != Path(parent_onnx).resolve()
    paths = [parent_onnx, candidate_onnx, candidate_onnx, *([student_onnx] if own else [])]
    sqnr, qsqnr, agree = SqnrAccumulator(), SqnrAccumulator(), PixelAgreement()
    fused_rows = sample_rows(len(data.x_test), config.cpu_int8_kernel_samples)
    k = task.num_classes
    sampled, seen = np.zeros((k, k), np.int64), [0]  # the candidate's Q/DQ confusion on the fused kernels' images

    def logits(raw) -> np.ndarray:
        return logits_output(dict(zip(raw[1], raw[0])), task)

    def on_batch(raw, masks, labels):
        sqnr.add(logits(raw[0]), logits(raw[1]))
        qsqnr.add(logits(raw[3] if own else raw[0]), logits(raw[1]))
        agree.add(masks[0], masks[1])
        rows = picked({2: fused_rows}, 2, seen[0], len(labels))
        sampled[...] += confusion(masks[1][rows], labels[rows], k, task.ignore_index)
        seen[0] += len(labels)

    sessions = [make_session(p, basic=b, threads=config.threads, side_by_side=True)
                for p, b in zip(paths, [None, None, False, None])]
    timer = BatchTimer([0, 1], config.latency_batches, config.latency_warmup, config.latency_repeats)
    cms = segment_batches(paths, data.x_test, data.y_test, task, on_batch=on_batch, sessions=sessions, timer=timer,
                          only={2: fused_rows}, batch=evaluation_batch(config.latency_batches))
    parent = _measured(parent_onnx, cms[0], timer.result(0, sessions[0]))
    cand = _measured(candidate_onnx, cms[1], timer.result(1, sessions[1]))
    metrics = {
        "metric_name": "miou",
        "task": "segmentation",
        "test_samples": int(len(data.x_test)),
        "source": parent,
        "candidate": {
            **cand,
            # top1_agreement mirrors the pixel agreement so the spine's registry metrics work.
            "fidelity": {"pixel_agreement": agree.share(), "top1_agreement": agree.share(),
                         "sqnr_db": round(sqnr.db(), 3), "quantization_sqnr_db": round(qsqnr.db(), 3)},
        },
    }
    if len(fused_rows):  # the fused kernels' mIoU beside the candidate's Q/DQ one, on the same images
        metrics["candidate"].update(cpu_int8_kernel_metric=segmentation_metrics(cms[2])["miou"],
                                    cpu_int8_kernel_samples=int(len(fused_rows)),
                                    cpu_int8_kernel_qdq_metric=segmentation_metrics(sampled)["miou"])
    metrics["candidate"]["size_ratio"] = round(parent["size_bytes"] / cand["size_bytes"], 3)
    return StageResult(model=Path(candidate_onnx), metrics=metrics, seconds=time.perf_counter() - t0)


def gate_segmentation(metrics: dict[str, Any], config) -> dict[str, Any]:
    """Judge a segmenter: mIoU drop, the worst class's IoU, pixel accuracy drop (``{passed, checks, summary}``).

    Args:
        metrics: :func:`evaluate_segmentation`'s metrics (``source``/``candidate`` with ``segmentation``).
        config: a ``SegmentationGateConfig``.
    """
    s, c = metrics["source"]["segmentation"], metrics["candidate"]["segmentation"]
    drop = round(s["miou"] - c["miou"], 4)
    acc_drop = round(s["pixel_accuracy"] - c["pixel_accuracy"], 4)
    worst, worst_iou = c.get("worst_class"), c.get("worst_class_iou", 0.0)
    checks = [
        GateCheck("miou_drop", drop, config.max_miou_drop, drop <= config.max_miou_drop,
                  f"mIoU fell {drop:.2f} pt ({s['miou']:.2f} -> {c['miou']:.2f}); allowed {config.max_miou_drop:.2f}"),
        GateCheck("min_class_iou", worst_iou, config.min_class_iou, worst_iou >= config.min_class_iou,
                  f"worst class {worst} has IoU {worst_iou:.2f} (fp32 "
                  f"{s['per_class_iou'].get(str(worst), 0.0):.2f}); required {config.min_class_iou:.2f}"),
        GateCheck("pixel_accuracy_drop", acc_drop, config.max_pixel_accuracy_drop,
                  acc_drop <= config.max_pixel_accuracy_drop,
                  f"pixel accuracy fell {acc_drop:.2f} pt ({s['pixel_accuracy']:.2f} -> {c['pixel_accuracy']:.2f}); "
                  f"allowed {config.max_pixel_accuracy_drop:.2f}"),
    ]
    return verdict(checks)


def check_segmenter(model, data: Splits, task) -> None:
    """Preflight for a segmentation recipe: the labels are class maps and the model gives logits that fit.

    Raises:
        DataError: the labels are no ``(H, W)`` class maps.
        ConfigError: the model's outputs are not ``(N, num_classes, H, W)`` logits (one line naming them).
    """
    import torch

    from edgeslim.components.common.model_outputs import forward_tensors, output_names

    y = np.asarray(data.y_test[:2])
    if y.ndim != 3 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"data: a segmentation task needs y_* class maps, per image an (H, W) integer mask; got "
                        f"labels of shape {list(y.shape)} ({y.dtype})")
    x = np.ascontiguousarray(data.x_test[:2])
    outs = [o.numpy() for o in forward_tensors(model.eval(), torch.from_numpy(x))]
    logits_output(dict(zip(output_names(len(outs)), outs)), task)
