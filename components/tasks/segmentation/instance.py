"""Instance segmentation outside the graph: YOLOv8-seg / YOLO11-seg outputs -> scored boxes and masks.

The model gives two outputs (Ultralytics' segmentation head in eval or export mode): the decoded
``(N, 4 + nc + nm, A)`` -- per anchor the box centre, width and height in input pixels, ``nc`` class
scores, ``nm`` mask coefficients -- and the prototype masks ``(N, nm, H/4, W/4)``. Per image the decoder
keeps anchors scoring at least ``min_score``, suppresses overlaps of one class (NMS at ``nms_iou``),
multiplies each kept anchor's coefficients with the prototypes, upsamples the mask logits (bilinear) to the
input, thresholds them at ``mask_threshold`` and crops them to the box (as Ultralytics' own predictor does). Decoding stays out of the graph so
that fp32, int8 and TensorRT outputs are judged by the same numpy code.

Instance labels (a split's ``y``) are per image a ``(k, H, W)`` uint8 stack at the input's size: instance
``j``'s pixels hold its class + 1, the rest 0 (the ``instance_labels`` helpers make and read them).

This module imports only numpy (the device agent can use it).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.boxes import box_iou  # noqa: F401  (re-exported)
from edgeslim.components.common.boxes import nms
from edgeslim.components.common.errors import ConfigError


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of binary masks ``a`` (N, H, W) and ``b`` (M, H, W)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = fa @ fb.T
    return inter / np.maximum(fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter, 1e-9)


def upsample_bilinear(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """Maps ``(M, h0, w0)`` resized to ``(M, h, w)`` bilinearly (half-pixel centres, as torch's
    ``align_corners=False``)."""
    _, h0, w0 = maps.shape

    def axis(n_out: int, n_in: int):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

    y0, y1, fy = axis(h, h0)
    x0, x1, fx = axis(w, w0)
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


def split_outputs(outputs: dict[str, Any], config) -> tuple[np.ndarray, np.ndarray]:
    """The decoded ``(N, 4+nc+nm, A)`` and prototype ``(N, nm, h, w)`` outputs among a model's outputs.

    Raises:
        ConfigError: they are missing or their shapes do not fit ``num_classes`` (one line naming the shapes).
    """
    dec = config.decoder
    names = [k for k in outputs if k != "backend"]
    shapes = {n: list(np.shape(outputs[n])) for n in names}
    actual = ", ".join(f"{n} {s}" for n, s in shapes.items())
    det = dec.output or next((n for n in names if len(shapes[n]) == 3), "")
    proto = dec.proto or next((n for n in names if len(shapes[n]) == 4), "")
    if det not in shapes or proto not in shapes:
        raise ConfigError(f"task.decoder: the model's outputs ({actual}) hold no decoded (N, 4+classes+masks, A) "
                          "output and prototype (N, masks, H, W) output; set task.decoder.output and "
                          "task.decoder.proto, or register the model in eval mode")
    d, p = shapes[det], shapes[proto]
    if len(d) != 3 or len(p) != 4 or d[1] != 4 + config.num_classes + p[1]:
        raise ConfigError(f"task.num_classes: outputs {det} {d} and {proto} {p} do not fit num_classes="
                          f"{config.num_classes}: the decoded output needs 4 box values + {config.num_classes} "
                          f"scores + {p[1] if len(p) == 4 else 'nm'} mask coefficients per anchor; the model's "
                          f"outputs are: {actual}")
    return np.asarray(outputs[det], np.float32), np.asarray(outputs[proto], np.float32)


def decode_instances(outputs: dict[str, Any], config, hw: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """Per image ``{"detections": (M, 6) [x1, y1, x2, y2, score, class], "masks": (M, H, W) bool}`` in
    input pixels, best first; ``hw`` the input's (height, width) (default: the prototypes' times 4)."""
    dec = config.decoder
    det, protos = split_outputs(outputs, config)
    nc = config.num_classes
    ph, pw = protos.shape[-2:]
    h, w = (int(hw[0]), int(hw[1])) if hw is not None else (4 * ph, 4 * pw)
    cut = float(np.log(dec.mask_threshold / (1.0 - dec.mask_threshold)))  # the threshold on the logits
    out = []
    for d, p in zip(det, protos):
        scores = d[4:4 + nc]
        cls, score = scores.argmax(0), scores.max(0)
        keep = np.flatnonzero(score >= dec.min_score)
        cx, cy, bw, bh = d[:4, keep]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        kept = nms(boxes, score[keep], dec.nms_iou, dec.max_detections, classes=cls[keep])
        idx = keep[kept]
        dets = np.concatenate([boxes[kept], score[idx, None], cls[idx, None].astype(np.float32)], 1).reshape(-1, 6)
        if not len(idx):
            out.append({"detections": dets.astype(np.float32), "masks": np.zeros((0, h, w), bool)})
            continue
        logits = (d[4 + nc:, idx].T @ p.reshape(len(p), -1)).reshape(-1, ph, pw)
        masks = upsample_bilinear(logits, h, w) > cut
        ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5  # pixel centres inside the box: the crop
        b = dets[:, :4]
        masks &= ((xs[None, None, :] >= b[:, 0, None, None]) & (xs[None, None, :] <= b[:, 2, None, None])
                  & (ys[None, :, None] >= b[:, 1, None, None]) & (ys[None, :, None] <= b[:, 3, None, None]))
        out.append({"detections": dets.astype(np.float32), "masks": masks})
    return out


# ------------------------------------------------------------------------------------------ labels

def instance_labels(classes: Sequence[int], masks: np.ndarray) -> np.ndarray:
    """Instances as a label: ``(k, H, W)`` uint8, instance ``j``'s pixels ``classes[j] + 1``."""
    m = np.asarray(masks, bool)
    c = np.asarray(classes, np.int64).reshape(-1)
    if len(c) and (c.min() < 0 or c.max() > 253):
        raise ValueError("instance classes must be in 0..253")
    return (m * (c[:, None, None] + 1)).astype(np.uint8)


def read_instances(label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An instance label's classes ``(k,)``, masks ``(k, H, W)`` bool and tight boxes ``(k, 4)``
    (instances left without a pixel, e.g. by a crop, are dropped)."""
    lab = np.asarray(label)
    if lab.ndim != 3:
        raise ValueError(f"an instance label is a (k, H, W) stack; got shape {list(lab.shape)}")
    masks = lab > 0
    keep = masks.reshape(len(lab), lab.shape[1] * lab.shape[2]).any(1)  # an image may have no instance
    lab, masks = lab[keep], masks[keep]
    classes = lab.reshape(len(lab), lab.shape[1] * lab.shape[2]).max(1, initial=0).astype(np.int64) - 1
    boxes = np.zeros((len(lab), 4), np.float32)
    for j, m in enumerate(masks):
        ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes[j] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return classes, masks, boxes
