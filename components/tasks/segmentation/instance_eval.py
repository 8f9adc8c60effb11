"""Instance segmentation evaluation and its gate.

Each test batch is decoded once per model (:func:`instance_batches`); per image only what mAP needs is
kept -- the detections ``(M, 6)``, their box IoU and mask IoU against the image's instances, and the
instances' classes -- never the masks, so memory does not follow the split's pixels. Box and mask mAP
@0.5 and @0.5:0.95 are COCO-style (greedy matching by score within a class, 101-point interpolated
precision, classes without instances left out); the mask figures match by mask IoU. Precision, recall and
the mean score of true positives are read at the deployment threshold and mask IoU 0.5.

The gate judges the mask mAP drops and the mean true-positive score: a calibrator that clips the score
output leaves the ranking, and so mAP, almost intact while every score falls.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.average_precision import IOU_THRESHOLDS, average_precision, by_score
from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError
from edgeslim.components.common.onnx_runtime import (BatchTimer, SqnrAccumulator, evaluation_batch, make_session,
                                                     sample_rows)
from edgeslim.components.common.result import GateCheck, StageResult, verdict
from edgeslim.components.tasks.segmentation.evaluate import picked, side_by_side
from edgeslim.components.tasks.segmentation.instance import box_iou, decode_instances, mask_iou, read_instances


@dataclasses.dataclass
class ImageRecord:
    """One image's detections ``(M, 6)``, their box and mask IoU ``(M, K)`` with its ``K`` instances, and the
    instances' classes."""

    dets: np.ndarray
    box_iou: np.ndarray
    mask_iou: np.ndarray
    classes: np.ndarray


def record(decoded: dict[str, np.ndarray], label: np.ndarray) -> ImageRecord:
    classes, masks, boxes = read_instances(label)
    d = decoded["detections"]
    if decoded["masks"].shape[1:] != masks.shape[1:]:
        raise DataError(f"instance labels of {list(masks.shape[1:])} pixels but the model's masks are "
                        f"{list(decoded['masks'].shape[1:])}; the labels must be at the model input's size")
    return ImageRecord(d, box_iou(d[:, :4], boxes), mask_iou(decoded["masks"], masks), classes)


def _match(records: Sequence[ImageRecord], cls: int, thr: float, which: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and TP flags of class ``cls`` detections over all images, sorted by score; #instances."""
    scores, tps, n_gt = [], [], 0
    for r in records:
        pick, gt = r.dets[:, 5] == cls, r.classes == cls
        n_gt += int(gt.sum())
        if not pick.any():
            continue
        s = r.dets[pick, 4]
        ious = getattr(r, which)[pick][:, gt]
        order = np.argsort(-s, kind="stable")
        tp = np.zeros(len(s), bool)
        taken = np.zeros(ious.shape[1], bool)
        for i in order:
            cand = np.where(~taken & (ious[i] >= thr), ious[i], -1.0)
            if cand.size and cand.max() >= 0:
                taken[int(cand.argmax())] = tp[i] = True
        scores.append(s)
        tps.append(tp)
    return by_score(scores, tps, n_gt)


def instance_metrics(records: Sequence[ImageRecord], num_classes: int, score_threshold: float) -> dict[str, Any]:
    """Box and mask mAP@0.5 and @0.5:0.95 (points), per-class mask AP@0.5, and at the deployment threshold
    (mask IoU 0.5) precision, recall and the mean true-positive score."""
    out: dict[str, Any] = {}
    for which, key in (("box_iou", "box"), ("mask_iou", "mask")):
        ap = np.full((num_classes, len(IOU_THRESHOLDS)), np.nan)
        tp_scores, tp_at, n_at, n_gt_all = [], 0, 0, 0
        for c in range(num_classes):
            for k, thr in enumerate(IOU_THRESHOLDS):
                s, tp, n_gt = _match(records, c, float(thr), which)
                ap[c, k] = average_precision(tp, n_gt)
                if k == 0 and which == "mask_iou":
                    tp_scores.append(s[tp])
                    tp_at += int((tp & (s >= score_threshold)).sum())
                    n_at += int((s >= score_threshold).sum())
                    n_gt_all += n_gt
        valid = ~np.isnan(ap[:, 0])
        out[f"{key}_map50"] = round(float(np.mean(ap[valid, 0])) * 100, 4) if valid.any() else 0.0
        out[f"{key}_map50_95"] = round(float(np.mean(ap[valid])) * 100, 4) if valid.any() else 0.0
        if which == "mask_iou":
            out["per_class_mask_ap50"] = {str(c): round(float(ap[c, 0]) * 100, 3) for c in range(num_classes)
                                          if valid[c]}
            tp_all = np.concatenate(tp_scores) if tp_scores else np.zeros(0)
            out.update(precision=round(100.0 * tp_at / n_at, 4) if n_at else 0.0,
                       recall=round(100.0 * tp_at / n_gt_all, 4) if n_gt_all else 0.0,
                       mean_tp_score=round(float(tp_all.mean()), 4) if len(tp_all) else 0.0,
                       true_positives=int(len(tp_all)), instances=int(n_gt_all), score_threshold=score_threshold)
    return out


def instance_batches(onnx_paths: Sequence[str | Path], x, y, task, *, basic: Sequence[bool | None] | bool | None = None,
                     batch: int = 32, on_batch=None, sessions: Sequence | None = None, timer=None,
                     only: dict[int, np.ndarray] | None = None) -> list[list[ImageRecord]]:
    """Per model, per image of ``x`` its :class:`ImageRecord` against the labels ``y``; the models run side
    by side a batch at a time (``x`` may be a lazy split: each batch is read once).

    ``on_batch`` is called with each batch's ``(raw, decoded, labels)``: per model ``(outputs, names)`` and
    per model its decoded images (:func:`.instance.decode_instances`). ``sessions``, ``timer``, ``only``: as
    :func:`.evaluate.side_by_side` takes them (a model in ``only`` has records of those images alone, and
    ``None`` in ``on_batch`` for a batch with none of them)."""
    records: list[list[ImageRecord]] = [[] for _ in onnx_paths]
    hw = tuple(x.shape[-2:])
    for start, labels, raw in side_by_side(onnx_paths, x, y, basic=basic, batch=batch, sessions=sessions,
                                           timer=timer, only=only):
        yb = list(labels)
        decoded = [None if r is None else decode_instances(dict(zip(r[1], r[0])), task, hw) for r in raw]
        for j, (recs, dec) in enumerate(zip(records, decoded)):
            if dec is None:
                continue
            rows = picked(only, j, start, len(yb))
            recs.extend(record(d, lab) for d, lab in zip(dec, yb if rows is None else [yb[i] for i in rows]))
        if on_batch is not None:
            on_batch(raw, decoded, yb)
    return records


def mask_agreement(reference: Sequence[dict], candidate: Sequence[dict], threshold: float, iou: float = 0.5
                   ) -> tuple[int, int]:
    """Of the reference's instances scored at least ``threshold``, how many the candidate also makes (same
    class, mask IoU >= ``iou``): ``(found, total)``."""
    hit = total = 0
    for r, c in zip(reference, candidate):
        rk, ck = r["detections"][:, 4] >= threshold, c["detections"][:, 4] >= threshold
        total += int(rk.sum())
        if not rk.any() or not ck.any():
            continue
        ious = mask_iou(r["masks"][rk], c["masks"][ck])
        same = r["detections"][rk, 5][:, None] == c["detections"][ck, 5][None, :]
        hit += int(((ious >= iou) & same).any(1).sum())
    return hit, total


def evaluate_instances(candidate_onnx: str | Path, config, *, parent_onnx: str | Path, data: Splits, task,
                       student_onnx: str | Path | None = None) -> StageResult:
    """An instance-segmentation candidate and its parent side by side on the test split (the parent and the
    candidate in Q/DQ semantics run on each batch in turn, the candidate on ORT's fused int8 kernels on
    ``config.cpu_int8_kernel_samples`` images spread over the split; the raw outputs' SQNR and the
    instances' agreement are summed over batches, and latency is timed on those runs)."""
    t0 = time.perf_counter()
    sqnr, agree = SqnrAccumulator(), [0, 0]

    def on_batch(raw, decoded, _labels):
        sqnr.add(np.concatenate([o.reshape(len(o), -1) for o in raw[0][0]], 1),
                 np.concatenate([o.reshape(len(o), -1) for o in raw[1][0]], 1))
        found, total = mask_agreement(decoded[0], decoded[1], task.score_threshold)
        agree[0] += found
        agree[1] += total

    paths = [parent_onnx, candidate_onnx, candidate_onnx]
    sessions = [make_session(p, basic=b, threads=config.threads, side_by_side=True)
                for p, b in zip(paths, [None, None, False])]
    fused_rows = sample_rows(len(data.x_test), config.cpu_int8_kernel_samples)
    timer = BatchTimer([0, 1], config.latency_batches, config.latency_warmup, config.latency_repeats)
    recs = instance_batches(paths, data.x_test, data.y_test, task, on_batch=on_batch, sessions=sessions, timer=timer,
                            only={2: fused_rows}, batch=evaluation_batch(config.latency_batches))
    k, thr = task.num_classes, task.score_threshold
    sections = []
    for i, (path, r) in enumerate(zip((parent_onnx, candidate_onnx), recs)):
        m = instance_metrics(r, k, thr)
        sections.append({"metric": m["mask_map50_95"], "instance_segmentation": m,
                         "size_bytes": Path(path).stat().st_size, "latency_ms": timer.result(i, sessions[i])})
    share = round(agree[0] / agree[1], 4) if agree[1] else 1.0
    metrics = {"metric_name": "mask_map50_95", "task": "segmentation", "test_samples": int(len(data.x_test)),
               "source": sections[0],
               "candidate": {**sections[1],
                             # top1_agreement mirrors the instance agreement so the spine's registry metrics work.
                             "fidelity": {"mask_agreement": share, "top1_agreement": share,
                                          "sqnr_db": round(sqnr.db(), 3)}}}
    if len(fused_rows):  # the fused kernels beside the candidate's Q/DQ figure, on the same images
        metrics["candidate"].update(
            cpu_int8_kernel_metric=instance_metrics(recs[2], k, thr)["mask_map50_95"],
            cpu_int8_kernel_samples=int(len(fused_rows)),
            cpu_int8_kernel_qdq_metric=instance_metrics([recs[1][i] for i in fused_rows], k, thr)["mask_map50_95"])
    metrics["candidate"]["size_ratio"] = round(sections[0]["size_bytes"] / sections[1]["size_bytes"], 3)
    return StageResult(model=Path(candidate_onnx), metrics=metrics, seconds=time.perf_counter() - t0)


def gate_instances(metrics: dict[str, Any], config) -> dict[str, Any]:
    """Mask mAP@0.5 drop, mask mAP@0.5:0.95 drop, mean true-positive score drop: ``{passed, checks, summary}``."""
    s, c = metrics["source"]["instance_segmentation"], metrics["candidate"]["instance_segmentation"]
    d50 = round(s["mask_map50"] - c["mask_map50"], 4)
    d = round(s["mask_map50_95"] - c["mask_map50_95"], 4)
    ds = round(s["mean_tp_score"] - c["mean_tp_score"], 4)
    checks = [
        GateCheck("mask_map50_drop", d50, config.max_mask_map_drop, d50 <= config.max_mask_map_drop,
                  f"mask mAP@0.5 fell {d50:.2f} pt ({s['mask_map50']:.2f} -> {c['mask_map50']:.2f}); "
                  f"allowed {config.max_mask_map_drop:.2f}"),
        GateCheck("mask_map50_95_drop", d, config.max_mask_map50_95_drop, d <= config.max_mask_map50_95_drop,
                  f"mask mAP@0.5:0.95 fell {d:.2f} pt ({s['mask_map50_95']:.2f} -> {c['mask_map50_95']:.2f}); "
                  f"allowed {config.max_mask_map50_95_drop:.2f}"),
        GateCheck("mean_tp_score_drop", ds, config.max_tp_score_drop, ds <= config.max_tp_score_drop,
                  f"mean true-positive score {s['mean_tp_score']:.3f} -> {c['mean_tp_score']:.3f}; "
                  f"allowed drop {config.max_tp_score_drop:.3f}"),
    ]
    result = verdict(checks)
    if not checks[2].passed and checks[0].passed:
        result["summary"] = ("confidences collapsed while mask mAP held: keep the class-score branch in float "
                             "(quantize.float_layers) or use quantize method auto. " + result["summary"])
    return result


def check_instance_segmenter(model, data: Splits, task) -> None:
    """Preflight for a ``yolo-seg`` recipe: the labels are instance stacks and the model's outputs fit the decoder.

    Raises:
        DataError: the labels are no ``(k, H, W)`` instance stacks.
        ConfigError: the outputs are not the decoded output and prototypes of ``num_classes`` (one line).
    """
    import torch

    from edgeslim.components.common.model_outputs import forward_tensors, output_names

    y0 = np.asarray(data.y_test[0]) if len(data.y_test) else None
    if y0 is None or y0.ndim != 3:
        raise DataError("data: a yolo-seg task needs per-image (k, H, W) instance stacks (npz object arrays, or "
                        "the yolo / coco provider with data.args.masks: true); got labels like "
                        f"{list(y0.shape) if y0 is not None else 'none'}")
    x = np.ascontiguousarray(data.x_test[:2])
    outs = [o.numpy() for o in forward_tensors(model.eval(), torch.from_numpy(x))]
    decode_instances(dict(zip(output_names(len(outs)), outs)), task, x.shape[-2:])
    if getattr(task, "loss_fn", ""):  # before anything trains: one line if it cannot be imported
        from edgeslim.components.tasks.segmentation.train_instance import label_loss

        label_loss(model, task)
