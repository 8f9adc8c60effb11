"""The detection reference workload, built offline from scikit-learn's digits.

- :func:`make_detection_splits`: digits pasted at random sizes and positions on
  blank canvases, with boxes and classes (fixed seeds; the test canvases use
  digits held out from the train and validation canvases).
- :class:`DigitsDetector`: a small YOLOv8-style detector: C2f blocks (split,
  residual bottlenecks, concat), SiLU, an FPN/PAN neck with upsample and concat
  at strides 4, 8 and 16, anchor-free decoupled heads; box outputs are
  left/top/right/bottom distances in stride units, class scores end in a sigmoid.
- trained with :func:`edgeslim.components.tasks.detection.train.train_detector` and the loss of
  :mod:`edgeslim.components.tasks.detection.loss`; minutes on a CPU.

The model returns a tuple ``(box_s4, cls_s4, box_s8, cls_s8, box_s16, cls_s16)``;
exported to ONNX they are ``output_0`` .. ``output_5``, which is what
:func:`default_heads` describes to the built-in decoder.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.tasks.detection.loss import (build_targets, detection_loss,  # noqa: F401  (re-exported)
                                                      output_distill_loss)
from edgeslim.components.transform.c2f import C2f, C2fNoSplit, Bottleneck, ConvBNAct, without_splits  # noqa: F401
from edgeslim.components.tasks.detection.train import NECK_OUTPUTS, train_detector  # noqa: F401  (re-exported)

CANVAS = 48
STRIDES = (4, 8, 16)
NUM_CLASSES = 10


# --------------------------------------------------------------------------- data

def _digit_pools(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = len(images) // 5
    n_val = len(images) // 10
    pools = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return images, d.target.astype(np.int64), pools


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a small 2-D image (numpy only: the data must not need torch)."""
    sh, sw = img.shape
    ys = (np.arange(h) + 0.5) * sh / h - 0.5
    xs = (np.arange(w) + 0.5) * sw / w - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, sh - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, sw - 1)
    y1, x1 = np.clip(y0 + 1, 0, sh - 1), np.clip(x0 + 1, 0, sw - 1)
    wy = np.clip(ys - y0, 0, 1)[:, None]
    wx = np.clip(xs - x0, 0, 1)[None, :]
    a, b = img[y0][:, x0], img[y0][:, x1]
    c, d = img[y1][:, x0], img[y1][:, x1]
    return (a * (1 - wy) * (1 - wx) + b * (1 - wy) * wx + c * wy * (1 - wx) + d * wy * wx).astype(np.float32)


def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def make_canvases(n: int, pool: np.ndarray, images: np.ndarray, targets: np.ndarray, *,
                  seed: int, canvas: int = CANVAS, max_objects: int = 3,
                  min_size: int = 8, max_size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases (N, 1, canvas, canvas) and their labels (object array of (k, 5) float32).

    Each canvas holds 1..``max_objects`` digits from ``pool``, each resized to a
    random side in [min_size, max_size] and pasted where it overlaps no earlier
    digit by more than IoU 0.1. A box is the tight box of the digit's ink.

    The background is a smooth random shade with pixel noise, not black: real
    images are dense, and on an all-black canvas a histogram calibrator clips the
    *input* to almost nothing (seen: entropy chose amax 0.06 for [0, 1] pixels).
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, canvas, canvas), dtype=np.float32)
    y = np.empty(n, dtype=object)
    for i in range(n):
        coarse = rng.uniform(0.0, 0.35, size=(4, 4)).astype(np.float32)
        x[i, 0] = np.clip(_resize(coarse, canvas, canvas) + rng.normal(0, 0.04, (canvas, canvas)), 0, 1)
        boxes: list[list[float]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(10):
                side = int(rng.integers(min_size, max_size + 1))
                h = side
                w = max(min_size - 2, int(round(side * rng.uniform(0.75, 1.0))))
                top = int(rng.integers(0, canvas - h + 1))
                left = int(rng.integers(0, canvas - w + 1))
                k = int(rng.choice(pool))
                patch = _resize(images[k], h, w)
                ink = np.argwhere(patch > 0.15)
                if len(ink) == 0:
                    continue
                (r0, c0), (r1, c1) = ink.min(0), ink.max(0)
                box = np.array([left + c0, top + r0, left + c1 + 1, top + r1 + 1], dtype=np.float32)
                if boxes and _iou_one(box, np.array(boxes)[:, :4]).max() > 0.1:
                    continue
                region = x[i, 0, top:top + h, left:left + w]
                np.maximum(region, patch, out=region)
                boxes.append([*box.tolist(), float(targets[k])])
                break
        y[i] = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    return x, y


def make_detection_splits(seed: int = 0, n_train: int = 2000, n_val: int = 300, n_test: int = 400,
                          canvas: int = CANVAS, max_objects: int = 3) -> Splits:
    """Train/val/test detection splits. The test canvases only use held-out digits."""
    images, targets, pools = _digit_pools(seed)
    parts = {}
    for j, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        parts[f"x_{split}"], parts[f"y_{split}"] = make_canvases(
            n, pools[split], images, targets, seed=seed * 1000 + j + 1, canvas=canvas,
            max_objects=max_objects)
    return Splits(**parts, source=f"digits-detect(seed={seed})")


class DigitsDetection:
    """Data provider ``digits-detect``: the synthetic detection splits.

    Args:
        seed: the same seed always gives the same canvases.
        n_train: train canvases.
        n_val: validation canvases.
        n_test: test canvases (held-out digits).
        max_objects: most digits on one canvas.
    """

    name = "digits-detect"

    def __init__(self, seed: int = 0, n_train: int = 2000, n_val: int = 300, n_test: int = 400,
                 max_objects: int = 3):
        from edgeslim.components.common.errors import ConfigError

        for key, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("max_objects", max_objects)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"data.args.{key}: got {v!r}; use a whole number >= 1")
        self.kw = {"seed": int(seed), "n_train": n_train, "n_val": n_val, "n_test": n_test,
                   "max_objects": max_objects}

    def describe(self) -> dict:
        return {"provider": self.name, **self.kw}

    def load(self) -> Splits:
        return make_detection_splits(**self.kw)


# --------------------------------------------------------------------------- model

class Head(nn.Module):
    """Decoupled head of one level: a box branch (4 distances) and a class branch (sigmoid)."""

    def __init__(self, cin: int, hidden: int, num_classes: int):
        super().__init__()
        self.box = nn.Sequential(ConvBNAct(cin, hidden, 3), nn.Conv2d(hidden, 4, 1))
        self.cls = nn.Sequential(ConvBNAct(cin, hidden, 3), nn.Conv2d(hidden, num_classes, 1))
        # Class logits start at p = 0.01 (RetinaNet's prior): stable BCE from the first step.
        nn.init.constant_(self.cls[-1].bias, -4.6)
        nn.init.constant_(self.box[-1].bias, 1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), torch.sigmoid(self.cls(x))


class DigitsDetector(nn.Module):
    """A small YOLOv8-style detector for 1x48x48 canvases.

    Args:
        width: channels of the first stage; later stages use 2x and 4x.
        num_classes: classes of the class head.
        head_hidden: channels inside each head branch.
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES, head_hidden: int = 24):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stem = ConvBNAct(1, w, 3, 2)                                          # /2
        self.stage1 = nn.Sequential(ConvBNAct(w, 2 * w, 3, 2), C2f(2 * w, 2 * w))  # /4
        self.stage2 = nn.Sequential(ConvBNAct(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w))  # /8
        self.stage3 = nn.Sequential(ConvBNAct(4 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w))  # /16
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        # FPN (top-down), then PAN (bottom-up).
        self.fpn8 = C2f(8 * w, 4 * w, shortcut=False)
        self.fpn4 = C2f(6 * w, 2 * w, shortcut=False)
        self.down4 = ConvBNAct(2 * w, 2 * w, 3, 2)
        self.pan8 = C2f(6 * w, 4 * w, shortcut=False)
        self.down8 = ConvBNAct(4 * w, 4 * w, 3, 2)
        self.pan16 = C2f(8 * w, 4 * w, shortcut=False)
        self.head = nn.ModuleList([Head(2 * w, head_hidden, num_classes),
                                   Head(4 * w, head_hidden, num_classes),
                                   Head(4 * w, head_hidden, num_classes)])

    def neck(self, x: torch.Tensor) -> list[torch.Tensor]:
        p4 = self.stage1(self.stem(x))
        p8 = self.stage2(p4)
        p16 = self.stage3(p8)
        f8 = self.fpn8(torch.cat([self.up(p16), p8], 1))
        n4 = self.fpn4(torch.cat([self.up(f8), p4], 1))
        n8 = self.pan8(torch.cat([self.down4(n4), f8], 1))
        n16 = self.pan16(torch.cat([self.down8(n8), p16], 1))
        return [n4, n8, n16]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        for head, feat in zip(self.head, self.neck(x)):
            outs.extend(head(feat))
        return tuple(outs)

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.zeros(batch, 1, CANVAS, CANVAS),)


HEAD_PATTERNS = ("head.*",)


def default_heads() -> list[dict]:
    """The built-in decoder's head list for :class:`DigitsDetector` exported to ONNX."""
    return [{"box": f"output_{2 * i}", "cls": f"output_{2 * i + 1}", "stride": s}
            for i, s in enumerate(STRIDES)]
