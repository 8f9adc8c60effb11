"""What a model's forward returns, as the tensors edgeslim exports, checks and decodes.

A forward may return a tensor, a tuple or list of tensors, or tensors with auxiliary
structures beside them: Ultralytics' ``DetectionModel`` in eval mode returns
``(decoded, {"boxes", "scores", "feats"})``, the decoded ``(N, 4+nc, A)`` tensor and the raw
head values its loss uses. The deployable outputs are the tensors at the top level; the
dicts and nested lists beside them are dropped, so the ONNX holds ``decoded`` alone (what
the model gives in its own export mode). A head that returns its tensors as a tuple first, then
its auxiliaries (Ultralytics' ``SegmentationModel`` in eval mode: ``((decoded, protos), {...})``), gives
that tuple's tensors. Outputs with no tensor at the top level or in such a first tuple (a bare dict, e.g.
a model left in training mode) are refused in one line.
"""

from __future__ import annotations

from typing import Any


def _is_tensor(o: Any) -> bool:
    return hasattr(o, "shape") and hasattr(o, "detach")


def describe(out: Any) -> str:
    """A short description of a forward's return value, for messages."""
    if _is_tensor(out):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, dict):
        return "a dict {" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(out.items())[:4]) + "}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} (" + ", ".join(describe(o) for o in list(out)[:6]) + \
            (", ..." if len(out) > 6 else "") + ")"
    return f"a {type(out).__name__}"


def has_auxiliaries(out: Any) -> bool:
    """Whether a forward's return value holds anything besides top-level tensors."""
    return isinstance(out, (tuple, list)) and not all(_is_tensor(o) for o in out)


def tensor_outputs(out: Any) -> list:
    """The top-level tensors of a forward's return value, in order.

    Raises:
        SourceError: it holds no tensor at the top level (one line: what it returned, the fix).
    """
    if _is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        tensors = [o for o in out if _is_tensor(o)]
        if not tensors and out and isinstance(out[0], (tuple, list)) and out[0] and all(map(_is_tensor, out[0])):
            tensors = list(out[0])  # ((decoded, protos), auxiliaries): Ultralytics' segmentation head
        if tensors:
            return tensors
    from edgeslim.components.common.errors import SourceError

    raise SourceError(
        f"the model returns {describe(out)} in eval mode; edgeslim needs a tensor or a tuple of tensors "
        "(a model left in training mode does this: log it after model.eval(), for Ultralytics "
        "model.model[-1].export = True; or wrap it in a module that returns its deployable tensors)")


def output_names(n: int) -> list[str]:
    """The ONNX output names edgeslim gives ``n`` outputs: ``output``, or ``output_0..``."""
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def forward_tensors(model, x) -> list:
    """``model(x)`` without gradients, as its top-level tensors (see :func:`tensor_outputs`)."""
    import torch

    with torch.no_grad():
        return tensor_outputs(model(x))


def exportable(model, x):
    """What ``torch.onnx.export`` is given for ``model``: ``model`` itself, or (when ``model(x)`` returns
    auxiliary structures beside its tensors) a module that returns the tensors alone. ``model`` is changed
    in place (its heads' ``dynamic`` flags), so pass a copy, as :func:`.export.export` does. A model whose outputs
    are already tensors is not wrapped, so its ONNX node names stay as they were."""
    import torch

    # Heads that cache their anchor grids and rebuild them only when the input shape changes (a
    # boolean ``dynamic`` flag, as YOLO heads have) compare the traced shape with the cached one,
    # which fixes the batch size into the graph; rebuilt on every call they trace with a free batch.
    for m in model.modules():
        if isinstance(getattr(m, "dynamic", None), bool):
            m.dynamic = True
    with torch.no_grad():
        if not has_auxiliaries(model(x)):
            return model

    class TensorOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            outs = tensor_outputs(self.inner(x))
            return outs[0] if len(outs) == 1 else tuple(outs)

    return TensorOutputs(model).eval()
