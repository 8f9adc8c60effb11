"""YOLOv8's C2f block, and the split-free twin that Torch-Pruning's dependency graph can prune."""

from __future__ import annotations

import copy

import torch
from torch import nn


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
