"""Make PyPI's torchvision importable beside this machine's CPU torch (test environment only).

PyPI's torchvision wheels are CUDA builds: beside the CPU torch 2.13.0 wheel, ``import torchvision``
fails in ``torchvision/_meta_registrations.py`` with ``operator torchvision::nms does not exist``
(docs/design.md). Its models, transforms and datasets work once its two registration modules are
skipped; only its C++ ops are missing, and of those only ``nms`` is used by what we test
(Ultralytics' validation), so a pure-torch ``nms``/``batched_nms`` stands in.

``tests/setup-machine.sh`` installs a one-line ``.pth`` that runs this file at interpreter start,
so it reaches every process of a test run (the local runner's tasks, CLI subprocesses with an
empty ``PYTHONPATH``). It only adds an import hook: nothing is imported until something imports
torchvision, and it changes nothing when torchvision's own ops load (a matching CPU build).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_SKIPPED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def _nms(boxes, scores, iou_threshold):
    import torch

    order = scores.argsort(descending=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep = []
    alive = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[i + 1:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[i + 1:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area[i + 1:] - inter).clamp(min=1e-9)
        alive[i + 1:] &= iou <= iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def _batched_nms(boxes, scores, idxs, iou_threshold):
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _ops_missing() -> bool:
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - registered only when torchvision's C++ library loads
        return False
    except (AttributeError, RuntimeError):
        return True


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        name = module.__name__
        if name == "torchvision" and _ops_missing():
            for skipped in _SKIPPED:
                sys.modules.setdefault(skipped, types.ModuleType(skipped))
        self.real.exec_module(module)
        if name == "torchvision.ops.boxes" and _ops_missing():
            module.nms = _nms
            module.batched_nms = _batched_nms
        elif name == "torchvision.ops" and _ops_missing():
            module.nms = _nms
            module.batched_nms = _batched_nms


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in ("torchvision", "torchvision.ops", "torchvision.ops.boxes"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(getattr(f, "_edgeslim_tv", False) for f in sys.meta_path):
    _finder = _Finder()
    _finder._edgeslim_tv = True
    sys.meta_path.insert(0, _finder)
