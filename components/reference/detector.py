"""The detection reference workload, built offline from scikit-learn's digits.

- :func:`make_detection_splits`: digits pasted at random sizes and positions on
  blank canvases, with boxes and classes (fixed seeds; the test canvases use
  digits held out from the train and validation canvases).
- :class:`DigitsDetector`: a small YOLOv8-style detector: C2f blocks (split,
  residual bottlenecks, concat), SiLU, an FPN/PAN neck with upsample and concat
  at strides 4, 8 and 16, anchor-free decoupled heads; box outputs are
  left/top/right/bottom distances in stride units, class scores end in a sigmoid.
- :func:`train_detector`: a centre-sampling assigner, BCE + GIoU + L1 losses,
  optional distillation from a teacher's neck features; minutes on a CPU.

The model returns a tuple ``(box_s4, cls_s4, box_s8, cls_s8, box_s16, cls_s16)``;
exported to ONNX they are ``output_0`` .. ``output_5``, which is what
:func:`default_heads` describes to the built-in decoder.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits

CANVAS = 48
STRIDES = (4, 8, 16)
NUM_CLASSES = 10
# Largest box side each level is trained on (overlapping, as in FCOS).
_LEVEL_RANGES = {4: (0.0, 16.0), 8: (11.0, 32.0), 16: (22.0, 1e9)}


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

class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, split in two, bottlenecks on one half, concat all, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBNAct(cin, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.c, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


def _half(block: "ConvBNAct", sl: slice) -> "ConvBNAct":
    conv, bn = block[0], block[1]
    out = ConvBNAct(conv.in_channels, sl.stop - sl.start, conv.kernel_size[0], conv.stride[0])
    with torch.no_grad():
        out[0].weight.copy_(conv.weight[sl])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(out[1], name).copy_(getattr(bn, name)[sl])
    out[1].eps, out[1].momentum = bn.eps, bn.momentum
    return out


class C2fNoSplit(nn.Module):
    """C2f with its split done by two 1x1 convs (the halves of ``cv1``): the same function.

    Torch-Pruning's dependency graph cannot follow ``split``/``chunk`` here (its
    own YOLOv8 example rewrites C2f the same way), so the pruner works on this form.
    """

    def __init__(self, block: C2f):
        super().__init__()
        c = block.c
        self.cv0a = _half(block.cv1, slice(0, c))
        self.cv0b = _half(block.cv1, slice(c, 2 * c))
        self.m = block.m
        self.cv2 = block.cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0a(x), self.cv0b(x)]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


def without_splits(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose C2f blocks are :class:`C2fNoSplit` (same outputs)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, C2f):
                setattr(mod, child_name, C2fNoSplit(child))
    return model


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


# Module names a feature-distillation pair can use: the neck outputs, one per stride.
NECK_OUTPUTS = ("fpn4", "pan8", "pan16")
HEAD_PATTERNS = ("head.*",)


def default_heads() -> list[dict]:
    """The built-in decoder's head list for :class:`DigitsDetector` exported to ONNX."""
    return [{"box": f"output_{2 * i}", "cls": f"output_{2 * i + 1}", "stride": s}
            for i, s in enumerate(STRIDES)]


# --------------------------------------------------------------------------- training

def build_targets(labels: Sequence[np.ndarray], canvas: int, num_classes: int,
                  strides: Sequence[int] = STRIDES) -> list[dict[str, np.ndarray]]:
    """Dense per-level targets: class (N, C, H, W), ltrb distances in strides (N, 4, H, W), positives.

    A cell is positive for a box when the box's larger side is in the level's range,
    the cell centre lies inside the box and within one stride of the box centre
    (the cell holding the centre always counts). Smaller boxes win shared cells.
    """
    out = []
    n = len(labels)
    for s in strides:
        g = canvas // s
        cls = np.zeros((n, num_classes, g, g), np.float32)
        box = np.zeros((n, 4, g, g), np.float32)
        pos = np.zeros((n, g, g), bool)
        area = np.full((n, g, g), np.inf, np.float32)
        centers = (np.arange(g) + 0.5) * s
        lo, hi = _LEVEL_RANGES.get(s, (0.0, 1e9))
        for i, lab in enumerate(labels):
            for x1, y1, x2, y2, c in np.asarray(lab).reshape(-1, 5):
                side = max(x2 - x1, y2 - y1)
                if not lo <= side < hi:
                    continue
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                mx = (centers > x1) & (centers < x2) & (np.abs(centers - cx) <= s)
                my = (centers > y1) & (centers < y2) & (np.abs(centers - cy) <= s)
                m = my[:, None] & mx[None, :]
                m[min(int(cy // s), g - 1), min(int(cx // s), g - 1)] = True
                a = (x2 - x1) * (y2 - y1)
                m &= a < area[i]
                if not m.any():
                    continue
                gy, gx = np.nonzero(m)
                px, py = centers[gx], centers[gy]
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


def train_detector(model: nn.Module, x: np.ndarray, labels: Sequence[np.ndarray], *, epochs: int = 20,
                   lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
                   teacher: nn.Module | None = None, feature_layers: Sequence[str] = (),
                   feature_weight: float = 1.0, output_alpha: float = 0.0,
                   progress: Callable[[int, int, float], None] | None = None) -> nn.Module:
    """Train ``model`` in place (AdamW, one-cycle); repeatable for a seed; returns it in eval mode.

    Args:
        model: a detector returning ``(box, cls)`` pairs per level like :class:`DigitsDetector`.
        x: canvases (N, C, H, W).
        labels: per canvas a (k, 5) array ``[x1, y1, x2, y2, class]``.
        teacher: distil from it: feature MSE at ``feature_layers`` (module names present in
            both models, e.g. the neck outputs), through learned 1x1 adapters.
        output_alpha: with a teacher, also distil its outputs (:func:`output_distill_loss`: its class
            scores as soft targets on every cell, its boxes where it is confident); the loss is
            ``(1 - output_alpha) * detection + output_alpha * output distillation`` (+ features).
        progress: called with (epoch, epochs, last loss).
    """
    from edgeslim.components.transform.distill import FeatureTap, _adapter

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num_classes = model(torch.from_numpy(x[:1]))[1].shape[1]
    tgt = build_targets(labels, x.shape[-1], num_classes)
    tgt_t = [{k: torch.from_numpy(v) for k, v in t.items()} for t in tgt]
    xt = torch.from_numpy(np.ascontiguousarray(x))
    params = list(model.parameters())
    adapters = nn.ModuleList()
    s_tap = t_tap = None
    if teacher is not None and (feature_layers or output_alpha):
        teacher = copy.deepcopy(teacher).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    else:
        teacher = None
    if teacher is not None and feature_layers:
        t_tap = FeatureTap(teacher, list(feature_layers), "teacher")
        s_tap = FeatureTap(model, list(feature_layers), "student")
        with torch.no_grad():
            model.eval()
            teacher(xt[:2])
            model(xt[:2])
        for name in feature_layers:
            adapters.append(_adapter(s_tap.outputs[name], t_tap.outputs[name]))
        params += list(adapters.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    try:
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            loss = torch.zeros(())
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                out = model(xt[idx])
                loss = detection_loss(out, [{k: v[idx] for k, v in t.items()} for t in tgt_t])
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xt[idx])
                    if output_alpha:
                        loss = (1.0 - output_alpha) * loss + output_alpha * output_distill_loss(out, t_out)
                if t_tap is not None:
                    for adapter, name in zip(adapters, feature_layers):
                        loss = loss + feature_weight * nn.functional.mse_loss(
                            adapter(s_tap.outputs[name]), t_tap.outputs[name])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            if progress:
                progress(epoch + 1, epochs, float(loss.detach()))
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
    return model.eval()
