"""Segmenter outputs -> masks, outside the graph: argmax, run-length encoding, mask IoU.

The argmax stays out of the ONNX graph so that fp32, int8 and TensorRT outputs are judged by the same
numpy code. Masks travel as COCO's uncompressed run-length encoding (``{"size": [h, w], "counts": [...]}``,
counts over the column-major pixels, starting with a run of zeros), one per class present in an image:
what the edge pyfunc returns (in source-image pixels when raw images were given) and what a release's
health check records and compares on the device, by IoU.

Used by the evaluator (:mod:`edgeslim.components.tasks.segmentation.evaluate`), the edge pyfunc and the
device health check. This module imports only numpy (the device agent can use it).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.errors import ConfigError


def logits_output(outputs: dict[str, Any], config) -> np.ndarray:
    """The logits ``(N, C, H, W)`` among a model's outputs (name -> array): ``config.output``, else the first.

    Raises:
        ConfigError: no such output, or it is not ``(N, num_classes, H, W)`` (one line naming the shapes).
    """
    names = [k for k in outputs if k != "backend"]
    name = config.output or (names[0] if names else "output")
    actual = ", ".join(f"{n} {list(np.shape(outputs[n]))}" for n in names)
    if name not in outputs:
        raise ConfigError(f"task.output: the model has no output {name!r}; its outputs are: {actual}")
    out = np.asarray(outputs[name])
    if out.ndim != 4 or out.shape[1] != config.num_classes:
        raise ConfigError(
            f"task.num_classes: output {name!r} has shape {list(out.shape)}; a segmenter gives per-pixel logits "
            f"[N, {config.num_classes}, H, W] (num_classes={config.num_classes}); the model's outputs are: {actual}; "
            "fix task.num_classes or task.output")
    return out


def argmax_masks(logits: np.ndarray, hw: Sequence[int] | None = None) -> np.ndarray:
    """Per-pixel classes ``(N, H, W)`` int32 of logits ``(N, C, h, w)``, at ``hw`` (nearest) when given and
    different (a model whose logits are coarser than its input)."""
    masks = np.asarray(logits).argmax(axis=1).astype(np.int32)
    if hw is not None and tuple(masks.shape[1:]) != tuple(hw):
        masks = resize_nearest(masks, int(hw[0]), int(hw[1]))
    return masks


def resize_nearest(masks: np.ndarray, h: int, w: int) -> np.ndarray:
    """Masks ``(..., H, W)`` resized to ``(..., h, w)`` by nearest neighbour (pixel centres)."""
    sh, sw = masks.shape[-2:]
    ys = np.minimum(((np.arange(h) + 0.5) * sh / h).astype(np.int64), sh - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * sw / w).astype(np.int64), sw - 1)
    return masks[..., ys[:, None], xs[None, :]]


def mask_to_source(mask: np.ndarray, geometry) -> np.ndarray:
    """An input-pixel mask ``(H, W)`` in the source image's pixels: each source pixel takes the class of
    the input pixel its centre lands on (the inverse of the preprocessing's resize, letterbox and crop;
    source pixels cut away by a crop take the nearest kept one)."""
    g = geometry
    sw, sh = g.source
    sx, sy = g.resized[0] / sw, g.resized[1] / sh
    ox = (g.pad[0] if g.pad else 0) - (g.crop[0] if g.crop else 0)
    oy = (g.pad[1] if g.pad else 0) - (g.crop[1] if g.crop else 0)
    h, w = mask.shape
    xs = np.clip(np.floor((np.arange(sw) + 0.5) * sx + ox).astype(np.int64), 0, w - 1)
    ys = np.clip(np.floor((np.arange(sh) + 0.5) * sy + oy).astype(np.int64), 0, h - 1)
    return mask[ys[:, None], xs[None, :]]


def rle_encode(binary: np.ndarray) -> dict[str, Any]:
    """A binary mask ``(H, W)`` as COCO's uncompressed RLE: ``{"size": [H, W], "counts": [...]}``, the
    run lengths over the column-major pixels, the first a run of zeros (0 when the first pixel is set)."""
    b = np.asarray(binary, bool)
    flat = b.reshape(-1, order="F")
    if not flat.size:
        return {"size": list(b.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(s) for s in b.shape], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The binary mask ``(H, W)`` of :func:`rle_encode`'s RLE."""
    h, w = (int(s) for s in rle["size"])
    counts = np.asarray(rle["counts"], np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, not {h}x{w} pixels")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")


def encode_masks(mask: np.ndarray, ignore: Sequence[int] = ()) -> list[dict[str, Any]]:
    """A class map ``(H, W)`` as one RLE per class present: ``[{"class": c, "size", "counts"}]``, by class."""
    return [{"class": int(c), **rle_encode(mask == c)} for c in np.unique(mask) if int(c) not in set(ignore)]


def decode_masks(encoded: list[dict[str, Any]], fill: int = 0) -> np.ndarray:
    """The class map of :func:`encode_masks`'s list (pixels no entry covers get ``fill``)."""
    if not encoded:
        raise ValueError("no masks to decode")
    out = np.full(tuple(int(s) for s in encoded[0]["size"]), fill, np.int32)
    for m in encoded:
        out[rle_decode(m)] = int(m["class"])
    return out


def class_ious(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    """Per class present in either class map, the IoU of its pixels in ``a`` and ``b``."""
    return {int(c): float(((a == c) & (b == c)).sum() / max(((a == c) | (b == c)).sum(), 1))
            for c in np.union1d(np.unique(a), np.unique(b))}


def box_to_source(box: Sequence[float], geometry) -> list[float]:
    """An input-pixel ``[x1, y1, x2, y2]`` box in the source image's pixels, clipped to it."""
    g = geometry
    sw, sh = g.source
    sx, sy = g.resized[0] / sw, g.resized[1] / sh
    ox = (g.pad[0] if g.pad else 0) - (g.crop[0] if g.crop else 0)
    oy = (g.pad[1] if g.pad else 0) - (g.crop[1] if g.crop else 0)
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(min(max((x1 - ox) / sx, 0.0), sw), 2), round(min(max((y1 - oy) / sy, 0.0), sh), 2),
            round(min(max((x2 - ox) / sx, 0.0), sw), 2), round(min(max((y2 - oy) / sy, 0.0), sh), 2)]


def encode_instances(decoded: dict[str, np.ndarray], geometry=None) -> list[dict[str, Any]]:
    """An image's decoded instances as ``[{"class", "score", "box", "size", "counts"}]`` (box and RLE mask in
    the source image's pixels when ``geometry`` is given, else the input's), best first."""
    out = []
    for d, m in zip(decoded["detections"], decoded["masks"]):
        box = [round(float(v), 2) for v in d[:4]]
        if geometry is not None:
            box, m = box_to_source(box, geometry), mask_to_source(m.astype(np.uint8), geometry) > 0
        out.append({"class": int(d[5]), "score": round(float(d[4]), 5), "box": box, **rle_encode(m)})
    return out


def compare_instances(golden: list[dict[str, Any]], got: list[dict[str, Any]], iou: float, score_tol: float
                      ) -> tuple[str | None, float]:
    """Each golden instance against the device's: found with the same class at mask IoU >= ``iou`` and a score
    within ``score_tol``; ``(reason or None, worst score difference)``."""
    used, worst = set(), 0.0
    masks = [rle_decode(g) for g in got]
    for n, want in enumerate(golden):
        w = rle_decode(want)
        best, best_iou = None, 0.0
        for j, (g, m) in enumerate(zip(got, masks)):
            if j in used or g["class"] != want["class"] or m.shape != w.shape:
                continue
            v = float((m & w).sum() / max((m | w).sum(), 1))
            if v > best_iou:
                best, best_iou = j, v
        if best is None or best_iou < iou:
            return (f"golden instance {n} (class {want['class']}, score {want['score']:.3f}) not found at mask "
                    f"IoU >= {iou:g} (best {best_iou:.3f})"), worst
        used.add(best)
        diff = abs(float(got[best]["score"]) - float(want["score"]))
        worst = max(worst, diff)
        if diff > score_tol:
            return f"golden instance {n} (class {want['class']}): score differs by {diff:.3f} (> {score_tol:g})", worst
    return None, round(worst, 6)


class SegmentationRuntime:
    """The segmenter's runtime half: a prediction adds its masks as RLE (semantic: one per class present;
    ``yolo-seg``: one per instance, with its class, score and box), and a release's health check records
    the golden masks, which a device's must match at IoU >= the rollout's ``iou`` (not raw outputs, which
    int8 engines of different builds do not reproduce to the bit)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def _masks(self, outputs: dict[str, Any]) -> np.ndarray:
        return argmax_masks(logits_output(outputs, self.config))

    def _instances(self, outputs: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        from edgeslim.components.tasks.segmentation.instance import decode_instances

        return decode_instances(outputs, self.config)

    def predict(self, outputs: dict[str, Any], geometries: list | None = None) -> dict[str, Any]:
        """``masks``: per image a list of ``{"class", "size", "counts"}`` (RLE; ``yolo-seg`` adds ``score`` and
        ``box``), in source-image pixels when ``geometries`` are given, else in the model input's."""
        if getattr(self.config, "instance", False):
            decoded = self._instances(outputs)
            return {"masks": [encode_instances(d, g) for d, g in zip(decoded, geometries or [None] * len(decoded))]}
        masks = self._masks(outputs)
        if geometries is not None:
            return {"masks": [encode_masks(mask_to_source(m, g)) for m, g in zip(masks, geometries)]}
        return {"masks": [encode_masks(m) for m in masks]}

    def golden(self, outputs: dict[str, Any], rollout: Any) -> dict[str, Any]:
        if getattr(self.config, "instance", False):
            th = self.config.score_threshold
            return {"instances": [[i for i in encode_instances(d) if i["score"] >= th]
                                  for d in self._instances(outputs)], "iou": rollout.iou, "score_tol": rollout.score_tol}
        return {"masks": [encode_masks(m) for m in self._masks(outputs)], "iou": rollout.iou}

    def compare(self, check: dict[str, Any], outputs: dict[str, Any]) -> tuple[str | None, float]:
        """``worst``: one minus the lowest class IoU of any golden image (``yolo-seg``: the largest score
        difference of a golden instance)."""
        if getattr(self.config, "instance", False):
            got, worst = [encode_instances(d) for d in self._instances(outputs)], 0.0
            for i, golden in enumerate(check.get("instances") or []):
                if i >= len(got):
                    return f"golden image {i}: the device returned {len(got)} image(s) of instances", worst
                reason, w = compare_instances(golden, got[i], float(check.get("iou", 0.9)),
                                              float(check.get("score_tol", 0.05)))
                worst = max(worst, w)
                if reason:
                    return f"golden image {i}: {reason}", worst
            return None, worst
        got = self._masks(outputs)
        need, worst = float(check.get("iou", 0.9)), 0.0
        for i, encoded in enumerate(check.get("masks") or []):
            if i >= len(got):
                return f"golden image {i}: the device returned {len(got)} mask(s)", worst
            want = decode_masks(encoded)
            if want.shape != got[i].shape:
                return (f"golden image {i}: the device's mask is {list(got[i].shape)} pixels; the golden one is "
                        f"{list(want.shape)}"), worst
            ious = class_ious(want, got[i])
            c, low = min(ious.items(), key=lambda kv: kv[1])
            worst = max(worst, 1.0 - low)
            if low < need:
                return f"golden image {i}: class {c}'s mask differs (IoU {low:.3f} < {need:g})", worst
        return None, round(worst, 6)
