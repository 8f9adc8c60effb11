"""A detector's per-image matches, for the intervals of the detection gate's drops
(:class:`~edgeslim.components.common.confidence.DetectionRecords`).

Each image's detections are matched to its ground-truth boxes as :mod:`.evaluate` matches them for mAP (per
class, greedily by score, at each IoU threshold); since matching never looks past an image, a resample of
the images only weights these records.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeslim.components.common.average_precision import IOU_THRESHOLDS
from edgeslim.components.common.confidence import DetectionRecords, detection_drops
from edgeslim.components.tasks.detection.runtime import box_iou


def detection_records(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int,
                      score_threshold: float) -> DetectionRecords:
    """Per image (M, 6) ``[x1, y1, x2, y2, score, class]`` detections and (K, 5) ``[x1, y1, x2, y2, class]``
    labels, as per-image records."""
    images, classes, scores, tps = [], [], [], []
    gt = np.zeros((len(gts), num_classes), np.int64)
    for i, (p, g) in enumerate(zip(preds, gts)):
        p, g = np.asarray(p, np.float32).reshape(-1, 6), np.asarray(g, np.float32).reshape(-1, 5)
        for c in range(num_classes):
            pc, gc = p[p[:, 5] == c], g[g[:, 4] == c]
            gt[i, c] = len(gc)
            if not len(pc):
                continue
            pc = pc[np.argsort(-pc[:, 4], kind="stable")]
            tp = np.zeros((len(pc), len(IOU_THRESHOLDS)), bool)
            if len(gc):
                # greedy by score at every threshold at once: each threshold keeps its own taken boxes
                ious, rows = box_iou(pc[:, :4], gc[:, :4]), np.arange(len(IOU_THRESHOLDS))
                taken = np.zeros((len(IOU_THRESHOLDS), len(gc)), bool)
                for j in range(len(pc)):
                    cand = np.where(~taken & (ious[j] >= IOU_THRESHOLDS[:, None]), ious[j], -1.0)
                    m = cand.argmax(1)
                    hit = cand[rows, m] >= 0
                    taken[rows[hit], m[hit]] = True
                    tp[j] = hit
            images.append(np.full(len(pc), i, np.int64))
            classes.append(np.full(len(pc), c, np.int64))
            scores.append(pc[:, 4].astype(np.float64))
            tps.append(tp)

    def cat(parts, dtype, shape=(0,)):
        return np.concatenate(parts) if parts else np.zeros(shape, dtype)

    return DetectionRecords(n=len(gts), det_image=cat(images, np.int64), det_class=cat(classes, np.int64),
                            det_score=cat(scores, np.float64), det_tp=cat(tps, bool, (0, len(IOU_THRESHOLDS))),
                            gt=gt, score_threshold=float(score_threshold))


def paired_detection_drops(parent_dets, candidate_dets, gts, task) -> dict:
    """The statistic of each drop the detection gate checks, parent against candidate on the same images."""
    gts = list(gts)
    return detection_drops(detection_records(parent_dets, gts, task.num_classes, task.score_threshold),
                           detection_records(candidate_dets, gts, task.num_classes, task.score_threshold))
