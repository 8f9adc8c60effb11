"""COCO-style average precision, shared by the evaluators that match objects to labels (boxes, masks): the
IoU thresholds of mAP@0.5:0.95, the 101-point interpolated AP of a class's matches, and the pooling of
per-image matches into one list sorted by score."""

from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)  # mAP@0.5:0.95's, as COCO counts them
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def by_score(scores: list[np.ndarray], tps: list[np.ndarray], n_gt: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-image scores and TP flags of one class pooled and sorted by score (highest first, ties in image
    order), with the class's number of labelled objects ``n_gt``."""
    if not scores:
        return np.zeros(0), np.zeros(0, bool), n_gt
    s, t = np.concatenate(scores), np.concatenate(tps)
    order = np.argsort(-s, kind="stable")
    return s[order], t[order], n_gt


def average_precision(tp: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP from TP flags sorted by score (NaN for a class with no labelled object)."""
    if n_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(tp) + 1)
    # Precision envelope (monotone non-increasing from the right).
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))
