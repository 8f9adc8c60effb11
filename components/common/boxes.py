"""Boxes ``[x1, y1, x2, y2]``: pairwise IoU and greedy non-maximum suppression, in numpy alone.

Shared by the detector and the instance segmenter (their decoders, evaluators and the device agent's
health check), so that every model's boxes are suppressed and matched by the same arithmetic.
"""

from __future__ import annotations

import numpy as np

# Sorted boxes are suppressed this many at a time: first by every box kept so far (one IoU matrix), then
# greedily among the block's survivors (one small matrix). Large enough that numpy's per-call cost is
# spread over many boxes, small enough that the block's own matrix stays a few MB.
_NMS_BLOCK = 64


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4), ``[x1, y1, x2, y2]``, in float64."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int | None = None,
        classes: np.ndarray | None = None) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first (at most ``limit``); with
    ``classes`` (one per box), boxes of different classes never suppress each other.

    Greedy NMS keeps a box when no better-scored kept box overlaps it by more than ``iou`` (ties in score
    keep the given order). The boxes are taken a block at a time in score order: a block's boxes are
    compared with every box kept so far at once, and only the block's survivors are then resolved among
    themselves, so the Python loop runs once per kept box over a handful of rows, not once per box over
    all of them. The result is exactly the plain loop's, IoU for IoU.
    """
    if classes is not None and len(boxes):  # each class's boxes moved clear of every other class's
        boxes = np.asarray(boxes) + np.asarray(classes)[:, None] * (float(np.abs(boxes).max()) + 1.0)
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(boxes, np.float64).reshape(-1, 4)[order]
    cap = int(limit) if limit and limit > 0 else len(order)
    kept: list[int] = []  # positions in ``ranked``
    for start in range(0, len(ranked), _NMS_BLOCK):
        block = ranked[start:start + _NMS_BLOCK]
        alive = np.arange(len(block))
        if kept:  # suppressed by an earlier block's kept box ("not <= iou": a NaN IoU suppresses, as greedily)
            alive = alive[(box_iou(ranked[kept], block) <= iou).all(0)]
        over = ~(box_iou(block[alive], block[alive]) <= iou)
        left = np.arange(len(alive))
        while left.size:
            i = left[0]
            kept.append(start + int(alive[i]))
            if len(kept) == cap:
                return order[kept]
            left = left[1:][~over[i, left[1:]]]
    return order[np.asarray(kept, np.int64)]
