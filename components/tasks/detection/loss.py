"""The detection loss edgeslim fine-tunes detectors with: a centre-sampling assigner, BCE + GIoU + L1,
and distillation from a teacher's head outputs.

The outputs are ``(box, cls)`` per level, boxes as left/top/right/bottom distances in stride units and
class scores after a sigmoid, as the reference detector and the built-in ``ltrb`` decoder have them.
The strides are the model's own (:func:`level_strides`: the recipe's decoder, ``model.stride``, or input
size over map size), and the box sizes each level learns follow from them (:func:`level_ranges`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

def level_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """Largest box side each level is trained on, finest level first: from 2.75 strides of the level
    below (0 for the finest) to 4 of its own strides (no limit for the coarsest); overlapping, as in
    FCOS. For strides (4, 8, 16): (0, 16), (11, 32), (22, inf), what the reference detector was trained on."""
    return [(0.0 if i == 0 else 2.75 * strides[i - 1], 4.0 * s if i < len(strides) - 1 else 1e9)
            for i, s in enumerate(strides)]


def level_strides(model, example: torch.Tensor, outputs: Sequence[torch.Tensor], task=None) -> list[int]:
    """The stride of each level of a detector returning ``(box, cls)`` map pairs, finest first.

    From the recipe's decoder (the stride of the head whose box map is ``output_{2*level}``, or the
    ``strides`` of a ``yolo-decoded`` decoder), else the model's ``stride`` attribute (Ultralytics models
    have one), else the input size over each level's map size.

    Raises:
        ConfigError: the strides given do not fit the model's maps (one line with both).
    """
    from edgeslim.components.common.errors import ConfigError

    boxes = list(outputs[0::2])
    hw = example.shape[-2:]
    measured = [int(hw[0]) // int(b.shape[-2]) for b in boxes]
    dec = getattr(task, "decoder", None)
    by_box = {h.box: h.stride for h in getattr(dec, "heads", [])}
    declared: list[int] = []
    if by_box and all(f"output_{2 * i}" in by_box for i in range(len(boxes))):
        declared, where = [by_box[f"output_{2 * i}"] for i in range(len(boxes))], "task.decoder.heads"
    elif getattr(dec, "strides", None):
        declared, where = list(dec.strides), "task.decoder.strides"
    elif getattr(model, "stride", None) is not None:
        own = [int(v) for v in torch.as_tensor(model.stride).reshape(-1).tolist()]
        declared, where = (own, "model.stride") if len(own) == len(boxes) else ([], "")
    if not declared:
        return measured
    grids = [list(b.shape[-2:]) for b in boxes]
    if len(declared) != len(boxes) or any(int(hw[0]) // s != g[0] or int(hw[1]) // s != g[1]
                                          for s, g in zip(declared, grids)):
        raise ConfigError(f"{where} gives strides {declared}, but the model's {len(boxes)} box maps are "
                          f"{grids} cells on a {list(hw)} input (strides {measured}); fix the strides")
    return declared


def build_targets(labels: Sequence[np.ndarray], canvas: int | Sequence[int], num_classes: int,
                  strides: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Dense per-level targets: class (N, C, H, W), ltrb distances in strides (N, 4, H, W), positives.

    A cell is positive for a box when the box's larger side is in the level's range
    (:func:`level_ranges`), the cell centre lies inside the box and within one stride of the box
    centre (the cell holding the centre always counts). Smaller boxes win shared cells.

    Args:
        canvas: the input's side, or its (height, width).
        strides: the model's strides, finest first (:func:`level_strides`).
    """
    out = []
    n = len(labels)
    ch, cw = (canvas, canvas) if isinstance(canvas, (int, np.integer)) else canvas
    for s, (lo, hi) in zip(strides, level_ranges(strides)):
        gh, gw = ch // s, cw // s
        cls = np.zeros((n, num_classes, gh, gw), np.float32)
        box = np.zeros((n, 4, gh, gw), np.float32)
        pos = np.zeros((n, gh, gw), bool)
        area = np.full((n, gh, gw), np.inf, np.float32)
        xs, ys = (np.arange(gw) + 0.5) * s, (np.arange(gh) + 0.5) * s
        for i, lab in enumerate(labels):
            for x1, y1, x2, y2, c in np.asarray(lab).reshape(-1, 5):
                side = max(x2 - x1, y2 - y1)
                if not lo <= side < hi:
                    continue
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                mx = (xs > x1) & (xs < x2) & (np.abs(xs - cx) <= s)
                my = (ys > y1) & (ys < y2) & (np.abs(ys - cy) <= s)
                m = my[:, None] & mx[None, :]
                m[min(int(cy // s), gh - 1), min(int(cx // s), gw - 1)] = True
                a = (x2 - x1) * (y2 - y1)
                m &= a < area[i]
                if not m.any():
                    continue
                gy, gx = np.nonzero(m)
                px, py = xs[gx], ys[gy]
                area[i, gy, gx] = a
                pos[i, gy, gx] = True
                cls[i, :, gy, gx] = 0.0
                cls[i, int(c), gy, gx] = 1.0
                box[i, :, gy, gx] = np.stack([px - x1, py - y1, x2 - px, y2 - py], 1) / s
        out.append({"cls": cls, "box": box, "pos": pos})
    return out


def _giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GIoU of ltrb distance pairs that share their anchor point (shape (M, 4))."""
    pl, pt, pr, pb = pred.unbind(1)
    tl, tt, tr, tb = target.unbind(1)
    inter = (torch.min(pl, tl) + torch.min(pr, tr)).clamp(min=0) * (torch.min(pt, tt) + torch.min(pb, tb)).clamp(min=0)
    union = (pl + pr) * (pt + pb) + (tl + tr) * (tt + tb) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.max(pl, tl) + torch.max(pr, tr)) * (torch.max(pt, tt) + torch.max(pb, tb))
    return iou - (hull - union) / hull.clamp(min=1e-6)


def detection_loss(outputs: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """BCE on every class cell, GIoU + L1 on positive box cells; normalised by positives."""
    total_pos = sum(float(t["pos"].sum()) for t in targets)
    norm = max(total_pos, 1.0)
    loss = outputs[0].new_zeros(())
    for lvl, t in enumerate(targets):
        box, score = outputs[2 * lvl], outputs[2 * lvl + 1]
        score = score.clamp(1e-6, 1 - 1e-6)
        loss = loss + nn.functional.binary_cross_entropy(score, t["cls"], reduction="sum") / norm
        pos = t["pos"]
        if pos.any():
            pb = box.permute(0, 2, 3, 1)[pos]
            tb = t["box"].permute(0, 2, 3, 1)[pos]
            loss = loss + 2.0 * (1.0 - _giou(pb.clamp(min=0), tb)).sum() / norm
            loss = loss + 0.5 * nn.functional.smooth_l1_loss(pb, tb, reduction="sum") / norm
    return loss


def output_distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                        box_min_score: float = 0.05) -> torch.Tensor:
    """Distillation on the head outputs: the teacher's class scores are soft BCE targets on every
    cell, and its boxes are regression targets (GIoU + L1, as in :func:`detection_loss`) on the
    cells where its best class score is at least ``box_min_score``, weighted by that score.
    Normalised by the sum of the teacher's best scores (its soft count of positives)."""
    best = [t.max(1).values for t in teacher[1::2]]
    norm = max(sum(float(b.sum()) for b in best), 1.0)
    loss = student[0].new_zeros(())
    for lvl, w in enumerate(best):
        s_box, s_cls = student[2 * lvl], student[2 * lvl + 1].clamp(1e-6, 1 - 1e-6)
        t_box, t_cls = teacher[2 * lvl], teacher[2 * lvl + 1]
        t_c = t_cls.clamp(1e-6, 1 - 1e-6)
        # BCE against soft targets minus their own entropy: the KL divergence, 0 when the scores match.
        kl = nn.functional.binary_cross_entropy(s_cls, t_c, reduction="sum") - \
            nn.functional.binary_cross_entropy(t_c, t_c, reduction="sum")
        loss = loss + kl / norm
        keep = w >= box_min_score
        if keep.any():
            pb = s_box.permute(0, 2, 3, 1)[keep]
            tb = t_box.permute(0, 2, 3, 1)[keep].clamp(min=0)
            wk = w[keep]
            loss = loss + (wk * 2.0 * (1.0 - _giou(pb.clamp(min=0), tb))).sum() / norm
            loss = loss + (wk * 0.5 * nn.functional.smooth_l1_loss(pb, tb, reduction="none").sum(1)).sum() / norm
    return loss
