"""A detector's per-image matches (:class:`~edgeslim.components.common.confidence.DetectionRecords`), built a
batch at a time, and every figure the detection evaluator reports read from them.

Each image's detections are matched to its ground-truth boxes per class, greedily by score, at each IoU
threshold (COCO's matching); since matching never looks past an image, the images can be matched as their
batch is decoded and dropped, and a resample of the images only weights the records. A record is twelve
bytes (image, class, score, and its matches as one bit per IoU threshold), so an evaluation holds its
split's detections in that form and never the images, the raw outputs or per-image arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.average_precision import IOU_THRESHOLDS, average_precision
from edgeslim.components.common.confidence import DetectionRecords, match_bits
from edgeslim.components.common.errors import DataError
from edgeslim.components.tasks.detection.runtime import box_iou


def _matches(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Whether each of one class's detections in one image (``p``, sorted by score) matches a label of ``g``
    at each IoU threshold: greedily by score, each threshold keeping its own taken labels."""
    tp = np.zeros((len(p), len(IOU_THRESHOLDS)), bool)
    if not len(g) or not len(p):
        return tp
    ious, rows = box_iou(p[:, :4], g[:, :4]), np.arange(len(IOU_THRESHOLDS))
    taken = np.zeros((len(IOU_THRESHOLDS), len(g)), bool)
    # a detection overlapping no label by the lowest threshold matches none and takes none
    for j in np.flatnonzero(ious.max(1) >= IOU_THRESHOLDS[0]):
        cand = np.where(~taken & (ious[j] >= IOU_THRESHOLDS[:, None]), ious[j], -1.0)
        m = cand.argmax(1)
        hit = cand[rows, m] >= 0
        taken[rows[hit], m[hit]] = True
        tp[j] = hit
    return tp


class DetectionRecorder:
    """:class:`DetectionRecords` built a batch of images at a time (:meth:`add`), in the order the images come.

    Args:
        num_classes: classes ``0..num_classes-1`` are scored; other labels and detections are left out.
        score_threshold: the deployment threshold (precision and recall are counted at it).
    """

    def __init__(self, num_classes: int, score_threshold: float):
        self.num_classes, self.score_threshold = int(num_classes), float(score_threshold)
        self.n = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._gt: list[np.ndarray] = []

    def add(self, preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> None:
        """Match the next images: per image (M, 6) ``[x1, y1, x2, y2, score, class]`` detections and (K, 5)
        ``[x1, y1, x2, y2, class]`` labels."""
        preds, gts = list(preds), list(gts)
        if len(preds) != len(gts):
            raise DataError(f"detections for {len(preds)} images but labels for {len(gts)}; they must pair up")
        images, classes, scores, tps = [], [], [], []
        gt = np.zeros((len(gts), self.num_classes), np.int32)
        for i, (p, g) in enumerate(zip(preds, gts)):
            p, g = np.asarray(p, np.float32).reshape(-1, 6), np.asarray(g, np.float32).reshape(-1, 5)
            present = np.union1d(p[:, 5], g[:, 4])
            for c in present[(present >= 0) & (present < self.num_classes) & (present == np.round(present))]:
                pc, gc = p[p[:, 5] == c], g[g[:, 4] == c]
                gt[i, int(c)] = len(gc)
                if not len(pc):
                    continue
                pc = pc[np.argsort(-pc[:, 4], kind="stable")]
                images.append(np.full(len(pc), self.n + i, np.int32))
                classes.append(np.full(len(pc), c, np.int16 if self.num_classes <= 32767 else np.int32))
                scores.append(pc[:, 4].copy())
                tps.append(match_bits(_matches(pc, gc)))
        if images:  # one array per batch and field: no per-image array outlives the batch
            self._parts.append((np.concatenate(images), np.concatenate(classes), np.concatenate(scores),
                                np.concatenate(tps)))
        self._gt.append(gt)
        self.n += len(gts)

    def records(self) -> DetectionRecords:
        """The records of every image added so far."""
        k = len(IOU_THRESHOLDS)
        fields = [np.concatenate(f) for f in zip(*self._parts)] if self._parts else \
            [np.zeros(0, np.int32), np.zeros(0, np.int16), np.zeros(0, np.float32), np.zeros(0, np.uint16)]
        gt = np.concatenate(self._gt) if self._gt else np.zeros((0, self.num_classes), np.int32)
        return DetectionRecords(n=self.n, det_image=fields[0], det_class=fields[1], det_score=fields[2],
                                det_tp=fields[3], gt=gt, score_threshold=self.score_threshold, thresholds=k)


def detection_records(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int,
                      score_threshold: float) -> DetectionRecords:
    """Per image (M, 6) ``[x1, y1, x2, y2, score, class]`` detections and (K, 5) ``[x1, y1, x2, y2, class]``
    labels, as per-image records."""
    rec = DetectionRecorder(num_classes, score_threshold)
    rec.add(preds, gts)
    return rec.records()


def _by_class(rec: DetectionRecords):
    """Per class: its detections' scores and matches, highest score first (ties in image order), and its
    labelled objects."""
    n_gt = rec.gt.sum(0, dtype=np.int64)
    for c in range(rec.gt.shape[1]):
        sel = np.flatnonzero(rec.det_class == c)
        sel = sel[np.argsort(-rec.det_score[sel], kind="stable")]
        yield c, rec.det_score[sel], rec.matches(sel), int(n_gt[c])


def record_metrics(rec: DetectionRecords) -> dict[str, Any]:
    """mAP@0.5, mAP@0.5:0.95, per-class AP@0.5, precision/recall at the threshold, mean TP score: percentages
    for mAP, precision and recall (points), scores in [0, 1]. Classes without a labelled object are left out
    of mAP."""
    classes, thr = rec.gt.shape[1], rec.score_threshold
    ap = np.full((classes, len(IOU_THRESHOLDS)), np.nan)
    tp_scores: list[np.ndarray] = []
    tp_at = n_pred_at = 0
    for c, s, tp, n_gt in _by_class(rec):
        ap[c] = [average_precision(tp[:, k], n_gt) for k in range(len(IOU_THRESHOLDS))]
        tp_scores.append(s[tp[:, 0]])
        tp_at += int((tp[:, 0] & (s >= thr)).sum())
        n_pred_at += int((s >= thr).sum())
    n_gt_all = int(rec.gt.sum())
    valid = ~np.isnan(ap[:, 0])
    tp_all = np.concatenate(tp_scores) if tp_scores else np.zeros(0)
    return {
        "map50": round(float(np.mean(ap[valid, 0])) * 100, 4) if valid.any() else 0.0,
        "map50_95": round(float(np.mean(ap[valid])) * 100, 4) if valid.any() else 0.0,
        "per_class_ap50": {str(c): round(float(ap[c, 0]) * 100, 3) for c in range(classes) if valid[c]},
        "precision": round(100.0 * tp_at / n_pred_at, 4) if n_pred_at else 0.0,
        "recall": round(100.0 * tp_at / n_gt_all, 4) if n_gt_all else 0.0,
        "mean_tp_score": round(float(tp_all.mean(dtype=np.float64)), 4) if len(tp_all) else 0.0,
        "true_positives": int(len(tp_all)),
        "ground_truth": n_gt_all,
        "score_threshold": thr,
    }


def record_pr_curve(rec: DetectionRecords, *, points: int = 200) -> dict[str, Any]:
    """Precision against recall at IoU 0.5, all classes pooled (each detection matched only to labels of its own
    class), at most ``points`` points, and the operating point at the deployment threshold."""
    parts = [(s, tp[:, 0], n) for _, s, tp, n in _by_class(rec)]
    s = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.float32)
    tp = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool)
    n_gt = sum(p[2] for p in parts)
    thr = rec.score_threshold
    out: dict[str, Any] = {"iou": float(IOU_THRESHOLDS[0]), "ground_truth": int(n_gt), "detections": int(len(s)),
                           "score_threshold": thr, "recall": [], "precision": [], "at_threshold": None}
    if not n_gt or not len(s):
        return out
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], tp[order]
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, len(tp) + 1)
    recall = ctp / n_gt
    idx = np.unique(np.linspace(0, len(s) - 1, min(points, len(s))).round().astype(int))
    out["recall"] = [round(float(v), 5) for v in recall[idx]]
    out["precision"] = [round(float(v), 5) for v in precision[idx]]
    k = int((s >= thr).sum())
    if k:
        out["at_threshold"] = {"recall": round(float(recall[k - 1]), 5), "precision": round(float(precision[k - 1]), 5)}
    return out


class AgreementCounter:
    """The share of the parent's detections above the threshold that the candidate also makes (same class,
    IoU >= ``iou``), counted a batch of images at a time."""

    def __init__(self, threshold: float, iou: float = 0.5):
        self.threshold, self.iou = float(threshold), float(iou)
        self.total = self.hit = 0

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> None:
        for r, c in zip(reference, candidate):
            r, c = r[r[:, 4] >= self.threshold], c[c[:, 4] >= self.threshold]
            self.total += len(r)
            if not len(r) or not len(c):
                continue
            ious = box_iou(r[:, :4], c[:, :4])
            same = r[:, 5][:, None] == c[:, 5][None, :]
            self.hit += int(((ious >= self.iou) & same).any(axis=1).sum())

    def share(self) -> float:
        return round(self.hit / self.total, 4) if self.total else 1.0

