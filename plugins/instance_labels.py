"""Instance masks for the ``yolo`` and ``coco`` providers (``data.args.masks: true``).

With ``masks: true`` a provider's ``y_*`` are :class:`LazyInstances`: per image a ``(k, H, W)`` uint8
stack in model-input pixels, instance ``j``'s pixels holding its class + 1 and 0 elsewhere (the labels a
``yolo-seg`` task reads, as the ``npz`` provider gives them). The providers keep only the outlines at
load -- polygons in source pixels, or COCO run-length counts -- and a stack is drawn when a stage
indexes its image, through the preprocessing's geometry (resize, letterbox, crop), so memory follows
the batch, never the split's pixels.

Polygons are filled at pixel centres: a pixel belongs to an instance when its centre lies inside the
polygon (even-odd rule within a polygon; a COCO instance's parts are united, as pycocotools does).
Run-length masks are decoded at the source size and placed by nearest-neighbour resampling.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.errors import DataError
from edgeslim.components.common.image_preprocess import Geometry, ImagePreprocessConfig

# An instance's outline: ("poly", [(n, 2) source-pixel points, ...]) or ("rle", (counts, height, width)).
Shape = tuple[str, Any]


def rle_counts(counts: Any, where: str) -> np.ndarray:
    """COCO run lengths (column-major, zeros first) from a list or from COCO's compressed string."""
    if isinstance(counts, list):
        try:
            out = np.asarray(counts, np.int64)
        except (TypeError, ValueError):
            out = np.asarray([-1])
    elif isinstance(counts, (str, bytes)):
        s = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
        vals: list[int] = []
        p = 0
        while p < len(s):
            x, k, more = 0, 0, True
            while more:
                if p >= len(s):
                    raise DataError(f"data {where}: its RLE counts string ends mid-number; write the mask again")
                c = ord(s[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)
            if len(vals) > 2:
                x += vals[-2]
            vals.append(x)
        out = np.asarray(vals, np.int64)
    else:
        out = np.asarray([-1])
    if out.ndim != 1 or (out < 0).any():
        raise DataError(f"data {where}: segmentation counts are not run lengths; give COCO RLE (a list of "
                        "counts or the compressed string) or polygons")
    return out


def decode_rle(counts: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    """An ``(height, width)`` bool mask from column-major run lengths."""
    if int(counts.sum()) != height * width:
        raise DataError(f"data {where}: RLE counts cover {int(counts.sum())} pixels but its size "
                        f"{height}x{width} has {height * width}; write the mask again at the image's size")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(width, height).T


def place(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """A source-size bool mask placed as ``g`` places its image: nearest resize, letterbox, crop."""
    from PIL import Image

    m = mask
    if g.resized != (m.shape[1], m.shape[0]):
        m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize(g.resized, resample=Image.Resampling.NEAREST)) > 0
    ox = (g.pad[0] if g.pad else 0) - (g.crop[0] if g.crop else 0)
    oy = (g.pad[1] if g.pad else 0) - (g.crop[1] if g.crop else 0)
    w, h = g.input_size
    out = np.zeros((h, w), bool)
    ys, xs = slice(max(oy, 0), min(oy + m.shape[0], h)), slice(max(ox, 0), min(ox + m.shape[1], w))
    if ys.stop > ys.start and xs.stop > xs.start:
        out[ys, xs] = m[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
    return out


def draw_polygons(polys: Sequence[np.ndarray], g: Geometry) -> np.ndarray:
    """Source-pixel polygons filled at the input's pixel centres (even-odd rule), as an ``(H, W)`` bool mask."""
    w, h = g.input_size
    out = np.zeros((h, w), bool)
    centres = np.arange(w) + 0.5
    for p in polys:
        a = g.points(p)
        b = np.roll(a, -1, axis=0)
        for r in range(max(int(np.floor(a[:, 1].min())), 0), min(int(np.ceil(a[:, 1].max())), h)):
            yc = r + 0.5
            cross = (a[:, 1] <= yc) != (b[:, 1] <= yc)
            if not cross.any():
                continue
            a0, b0 = a[cross], b[cross]
            xs = np.sort(a0[:, 0] + (yc - a0[:, 1]) * (b0[:, 0] - a0[:, 0]) / (b0[:, 1] - a0[:, 1]))
            out[r] |= np.searchsorted(xs, centres, side="right") % 2 == 1
    return out


class LazyInstances:
    """One split's instance labels, drawn a batch at a time: ``len``, indexing (an int gives one
    ``(k, H, W)`` uint8 stack, a slice or index array an object array of them), ``digest()``.

    Args:
        items: per image ``(source width, source height, classes (k,), shapes (k,))``.
        preprocess: the images' preprocessing (its geometry places the masks).
    """

    dtype = np.dtype(object)
    ndim = 1

    def __init__(self, items: Sequence[tuple[int, int, np.ndarray, list[Shape]]], preprocess: ImagePreprocessConfig):
        self.items, self.preprocess = list(items), preprocess

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int]:
        return (len(self.items),)

    def __repr__(self) -> str:
        return f"LazyInstances({len(self)} images)"

    def stack(self, i: int) -> np.ndarray:
        w, h, classes, shapes = self.items[i]
        g = self.preprocess.geometry(w, h)
        iw, ih = g.input_size
        out = np.zeros((len(shapes), ih, iw), np.uint8)
        for j, (kind, spec) in enumerate(shapes):
            m = draw_polygons(spec, g) if kind == "poly" else place(decode_rle(*spec, where=f"image {i}"), g)
            out[j][m] = int(classes[j]) + 1
        return out

    def __getitem__(self, key: Any):
        n = len(self.items)
        if isinstance(key, (int, np.integer)):
            return self.stack(int(key) % n)
        if isinstance(key, slice):
            rows = list(range(*key.indices(n)))
        else:
            idx = np.asarray(key.numpy() if hasattr(key, "numpy") else key)
            rows = list(np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1) % max(n, 1))
        out = np.empty(len(rows), dtype=object)
        out[:] = [self.stack(r) for r in rows] if rows else []
        return out

    def __iter__(self):
        return (self.stack(i) for i in range(len(self.items)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:]

    def digest(self) -> str:
        """sha256 of the outlines, classes, source sizes and preprocessing (no mask is drawn)."""
        h = hashlib.sha256(json.dumps(self.preprocess.to_dict(), sort_keys=True).encode())
        for w, hh, classes, shapes in self.items:
            h.update(f"{w}x{hh}:".encode() + np.asarray(classes, np.int64).tobytes())
            for kind, spec in shapes:
                parts = spec if kind == "poly" else [spec[0], np.asarray(spec[1:], np.int64)]
                h.update(kind.encode() + b"".join(np.ascontiguousarray(p, np.float64).tobytes() for p in parts))
        return h.hexdigest()


def coco_shape(seg: Any, width: float, height: float, where: str) -> Shape:
    """An annotation's ``segmentation`` (polygons, or RLE with list or compressed counts) as a :data:`Shape`."""
    if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
        polys = []
        for p in seg:
            try:
                a = np.asarray(p, np.float64)
            except (TypeError, ValueError):
                a = np.zeros(1)
            if a.ndim != 1 or len(a) < 6 or len(a) % 2 or not np.isfinite(a).all():
                raise DataError(f"data {where}: a polygon of {len(p)} values; COCO polygons are [x1, y1, x2, y2, "
                                "x3, y3, ...] in pixels, at least 3 points")
            polys.append(a.reshape(-1, 2))
        return ("poly", polys)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        try:
            h, w = (int(v) for v in seg["size"])
        except (TypeError, ValueError):
            h = w = -1
        if (w, h) != (int(round(width)), int(round(height))):
            raise DataError(f"data {where}: RLE size {seg['size']} is not the image's [height, width] "
                            f"[{int(round(height))}, {int(round(width))}]; write the mask at the image's size")
        return ("rle", (rle_counts(seg["counts"], where), h, w))
    raise DataError(f"data {where}: no segmentation (polygons or RLE); data.args.masks: true needs an outline "
                    "per annotation: add it, or drop masks for boxes only")
