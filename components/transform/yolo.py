"""What structural pruning needs to know about a detector it did not build (e.g. Ultralytics YOLO).

Everything here goes by structure and class name, never by importing the model's library:

- :func:`split_free`: blocks that split one conv's output into halves (YOLO's ``C2f``/``C3k2``,
  ``C2PSA``) become twins with two convs instead of the split, the same function (checked on a
  random input) that Torch-Pruning's dependency graph can prune: the halves may then lose different
  channels, which the original forward (``chunk(2)`` or ``split((c, c))``) could not express. The
  pruned model keeps the twins (it runs and exports as before, with the same outputs).
- :func:`last_layers`: the conv/linear layers whose output reaches a model output through no other
  trainable layer (the per-level box and class convs of a YOLO head), found on the autograd graph of
  one forward pass; a layer with a frozen weight on the way (YOLO's DFL conv, a fixed integral) is
  part of the decode: it is kept whole too, and the search goes on behind it.
- :func:`attention_layers`: the layers of a module with an integer ``num_heads`` (YOLO11's
  ``Attention``) whose children are wrappers rather than plain layers: its channels are laid out head by head, so they are kept whole.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@contextlib.contextmanager
def training_outputs(*models: nn.Module):
    """Inside the block, heads with a boolean ``export`` flag (YOLO's Detect and Segment) leave export mode, so
    that a model returns its raw head values in training mode and beside its decoded outputs in eval mode alike."""
    flagged = [m for model in models for m in model.modules() if isinstance(getattr(m, "export", None), bool)]
    before = [m.export for m in flagged]
    for m in flagged:
        m.export = False
    try:
        yield
    finally:
        for m, flag in zip(flagged, before):
            m.export = flag


def _class_names(mod: nn.Module) -> set[str]:
    return {c.__name__ for c in type(mod).__mro__}


def _halve(block: nn.Module, sl: slice) -> nn.Module:
    """A copy of ``block`` (a conv, or a wrapper holding one conv and its norm) producing channels ``sl``."""
    out = copy.deepcopy(block)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Conv2d):
                m.weight = nn.Parameter(m.weight[sl].clone(), requires_grad=m.weight.requires_grad)
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias[sl].clone(), requires_grad=m.bias.requires_grad)
                m.out_channels = sl.stop - sl.start
            elif isinstance(m, nn.BatchNorm2d):
                for name in ("weight", "bias"):
                    p = getattr(m, name)
                    if p is not None:
                        setattr(m, name, nn.Parameter(p[sl].clone(), requires_grad=p.requires_grad))
                for name in ("running_mean", "running_var"):
                    if getattr(m, name) is not None:
                        setattr(m, name, getattr(m, name)[sl].clone())
                m.num_features = sl.stop - sl.start
    return out


def _one_conv(block: nn.Module) -> nn.Conv2d | None:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[0] if len(convs) == 1 else None


class _SplitFree(nn.Module):
    """A block whose ``cv1`` output was split in halves ``c`` wide, with the halves from two convs."""

    def __init__(self, block: nn.Module, c: int):
        super().__init__()
        self.cv1a = _halve(block.cv1, slice(0, c))
        self.cv1b = _halve(block.cv1, slice(c, 2 * c))
        self.m = block.m
        self.cv2 = block.cv2


class SplitFreeC2f(_SplitFree):
    """YOLO's C2f (and C3k2): ``cv1`` split in halves, blocks chained on the second, all concatenated,
    ``cv2``; here the halves come from two convs (``cv1a``, ``cv1b``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitFreeC2PSA(_SplitFree):
    """YOLO11's C2PSA: ``cv1`` split in halves ``a, b``; ``cv2(cat(a, m(b)))``; the halves from two convs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1a(x), self.m(self.cv1b(x))), 1))


# Class names (anywhere in the block's class hierarchy) -> the split-free twin.
_TWINS = {"C2f": SplitFreeC2f, "C2PSA": SplitFreeC2PSA}


def _twin(block: nn.Module) -> nn.Module | None:
    """The split-free twin of ``block``, or None when it is no known split block or the twin differs."""
    kind = next((t for n, t in _TWINS.items() if n in _class_names(block)), None)
    c = getattr(block, "c", None)
    if kind is None or not isinstance(c, int) or not all(hasattr(block, a) for a in ("cv1", "cv2", "m")):
        return None
    conv = _one_conv(block.cv1)
    if conv is None or conv.out_channels != 2 * c or conv.groups != 1:
        return None
    twin = kind(copy.deepcopy(block), c)
    # Attributes the parent model reads from its layers (Ultralytics: f, i, type, np) come along.
    for k, v in vars(block).items():
        if not k.startswith("_") and k not in vars(twin) and not isinstance(v, nn.Module):
            setattr(twin, k, v)
    was = block.training
    block.eval(), twin.eval()
    x = torch.randn(2, conv.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            same = torch.allclose(block(x), twin(x), rtol=1e-4, atol=1e-4)
    except Exception:  # a forward this twin does not reproduce: leave the block as it is
        same = False
    block.train(was), twin.train(was)
    return twin if same else None


def split_free(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with its split blocks replaced by split-free twins; and their names."""
    model = copy.deepcopy(model)
    swapped = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            twin = _twin(child)
            if twin is not None:
                setattr(mod, child_name, twin)
                swapped.append(f"{name}.{child_name}" if name else child_name)
    return model, swapped


def _weight_of(fn, owners: dict[int, str]) -> str | None:
    """The layer whose weight the autograd node ``fn`` (a convolution or matmul) multiplies by, if any."""
    todo = [(f, 0) for f, _ in fn.next_functions if f is not None]
    while todo:
        f, depth = todo.pop()
        var = getattr(f, "variable", None)
        if var is not None and id(var) in owners:
            return owners[id(var)]
        if depth < 1 and type(f).__name__.startswith(("TBackward", "TransposeBackward", "PermuteBackward")):
            todo += [(g, depth + 1) for g, _ in f.next_functions if g is not None]
    return None


def last_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv/linear layers whose output reaches the model's outputs through no other trainable layer.

    Walks the autograd graph of one forward pass (on a copy, every weight made to require a
    gradient) back from the outputs to the first layer on each path. A layer whose weight was
    frozen (``requires_grad`` False, like YOLO's DFL integral conv) is listed and walked through.
    """
    from edgeslim.components.common.model_outputs import tensor_outputs

    work = copy.deepcopy(model).eval()
    owners: dict[int, str] = {}
    frozen: set[str] = set()
    for name, mod in work.named_modules():
        if isinstance(mod, _LAYER_TYPES) and name:
            owners[id(mod.weight)] = name
            if not mod.weight.requires_grad:
                frozen.add(name)
    for p in work.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        outs = tensor_outputs(work(example[:1]))
    found: list[str] = []
    seen: set = set()
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kind = type(fn).__name__
        layer = _weight_of(fn, owners) if kind.startswith(("Convolution", "Addmm", "Mm", "Bmm", "Linear",
                                                              "MkldnnConvolution", "Matmul")) else None
        if layer is not None:
            if layer not in found:
                found.append(layer)
            if layer not in frozen:
                continue
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return sorted(found)


def attention_layers(model: nn.Module) -> list[str]:
    """The conv/linear layers inside every module with an integer ``num_heads`` whose own children
    are wrappers (a plain-layer attention is handled by the generic pruner)."""
    found: set[str] = set()
    for name, mod in model.named_modules():
        heads = getattr(mod, "num_heads", None)
        if not name or isinstance(heads, bool) or not isinstance(heads, int):
            continue
        children = list(mod.children())
        if not children or any(isinstance(c, _LAYER_TYPES) for c in children):
            continue
        found |= {f"{name}.{n}" for n, m in mod.named_modules() if isinstance(m, _LAYER_TYPES) and n}
    return sorted(found)
