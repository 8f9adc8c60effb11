"""export: torch module -> ONNX with a dynamic batch axis, checked against torch."""

from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError, SourceError
from edgeslim.components.common.model_outputs import exportable, forward_tensors
from edgeslim.components.common.model_outputs import output_names as tensor_output_names
from edgeslim.components.common.onnx_runtime import make_session, run_batched  # noqa: F401  (make_session re-exported)
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import DEFAULT_OPSET, OnnxExportConfig

INPUT_NAME = "input"
log = logging.getLogger(__name__)


def check_model_accepts(model, x: np.ndarray) -> np.ndarray:
    """Run ``model`` on a small batch; a shape it rejects becomes a ``DataError``."""
    import torch

    try:
        outs = forward_tensors(model, torch.from_numpy(np.ascontiguousarray(x)))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the model rejects inputs of shape {list(x.shape)} ({first}); "
            "give data whose x arrays match the model's input"
        ) from None
    if len(outs) > 1:
        return np.concatenate([o.detach().numpy().reshape(len(x), -1) for o in outs], axis=1)
    return outs[0].detach().numpy()


def output_names(model, x: np.ndarray) -> list[str]:
    import torch

    return tensor_output_names(len(forward_tensors(model, torch.from_numpy(x[:1]))))


def export(model, config: OnnxExportConfig, *, data: Splits, out_path: str | Path) -> StageResult:
    """Export ``model`` to ONNX and check its outputs against torch.

    Args:
        model: an ``nn.Module`` in eval mode (it is not modified).
        config: opset and check tolerance.
        data: the splits; ``x_test`` feeds the check.
        out_path: the ``.onnx`` file to write.

    Returns:
        ``StageResult`` whose model is the ONNX path, with ``max_abs_diff``, ``size_bytes`` and the
        model's ``macs`` (one sample's forward pass) and ``params`` (:func:`count_size`).

    Raises:
        DataError: the model rejects the data's input shape.
        SourceError: export fails, or its outputs differ from torch beyond ``atol``.
    """
    import torch

    t0 = time.perf_counter()
    model = copy.deepcopy(model).eval()
    x = data.x_test[: config.check_samples]
    reference = check_model_accepts(model, x)
    names = output_names(model, x)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.ascontiguousarray(x[:2]))
    counted = count_size(model, example[:1])
    # A forward that returns auxiliaries beside its tensors (Ultralytics: (decoded, {...})) exports its tensors.
    model = exportable(model, example)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=max(config.resolved_opset, DEFAULT_OPSET),
                input_names=[INPUT_NAME], output_names=names,
                dynamic_shapes=({0: batch},), external_data=False, verbose=False,
            )
            program.optimize()
            program.save(str(out_path), external_data=False)
        name_folded_weights(out_path, model)
    except Exception as exc:  # the exporter raises many types; all mean the same to a user
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SourceError(
            f"ONNX export failed ({type(exc).__name__}: {msg}); the model must be traceable by torch.export"
        ) from None
    if config.resolved_opset < DEFAULT_OPSET:
        convert_opset(out_path, config.resolved_opset)
    fixed = fixed_batch(out_path)
    if fixed is not None:
        raise SourceError(
            f"ONNX export fixed the batch size at {fixed}: the model's forward turns it into a Python number "
            "(len(x), int(x.shape[0]), a loop over the batch); write it with x.shape[0], x.flatten(1) or "
            "x.reshape(x.shape[0], -1) so the batch axis stays dynamic"
        )
    try:
        got = run_onnx(out_path, x)
    except Exception as exc:  # ORT raises its own types when the graph rejects the check batch
        raise SourceError(f"the exported ONNX cannot run the check samples ({str(exc).splitlines()[0][:200]})") from None
    err = np.abs(got - reference)
    diff = float(np.max(err)) if got.size else 0.0
    # Relative to each output channel's largest value (axis 1: a logit, a box coordinate row, a feature map):
    # a box corner near 0 px is a difference of values in the hundreds, and carries their rounding.
    scale = np.abs(reference).max(axis=tuple(a for a in range(reference.ndim) if a != 1), keepdims=True) \
        if reference.ndim >= 2 and got.size else np.abs(reference).max(initial=0.0)
    over = float(np.max(err - config.rtol * scale)) if got.size else 0.0
    if not np.isfinite(diff) or over > config.atol:
        raise SourceError(
            f"ONNX export differs from torch by {diff:.3g} (> atol {config.atol} + rtol {config.rtol} x the "
            "channel's largest |value|); raise export.atol or check for data-dependent control flow"
        )
    return StageResult(
        model=out_path,
        metrics={"max_abs_diff": diff, "size_bytes": out_path.stat().st_size, "opset": config.resolved_opset, **counted},
        lineage={"export": config.to_json_dict()},
        seconds=time.perf_counter() - t0,
    )


# Opset 18 moved the axes of these reductions from an attribute to an input (ReduceSum: 13).
_REDUCE_AXES_INPUT_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                         "ReduceMin", "ReduceProd", "ReduceSumSquare")


def convert_opset(path: Path, opset: int) -> None:
    """Rewrite the ONNX at ``path`` (default-domain opset 18) in the older ``opset``.

    ONNX's version converter has no 18 -> 17 adapter for Split and leaves the Reduce* ops
    invalid, so that step is done here: Split loses ``num_outputs`` (17 splits evenly into its
    outputs), a reduction's constant ``axes`` input becomes its attribute, and Resize loses the
    attributes 18 added where they hold their defaults. ONNX's converter takes it from 17 on.

    Raises:
        SourceError: the graph uses what opset 17 cannot say (an op new in 18, computed axes).
    """
    import onnx
    from onnx import helper, numpy_helper, version_converter

    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def refuse(node, why: str):
        return SourceError(f"the exported graph cannot be written in opset {opset}: {node.op_type} "
                           f"{node.name!r} {why}; use export.opset 18 and a device class whose TensorRT parses it")

    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        drop = set()
        if node.op_type == "Split":
            drop.add("num_outputs")
        elif node.op_type in _REDUCE_AXES_INPUT_18:
            if attrs.get("noop_with_empty_axes", 0):
                raise refuse(node, "reduces nothing when its axes are empty (noop_with_empty_axes)")
            drop.add("noop_with_empty_axes")
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in consts:
                    raise refuse(node, "takes computed axes")
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in consts[node.input[1]].ravel()]))
                del node.input[1:]
        elif node.op_type == "Resize":
            if attrs.get("antialias", 0) or "axes" in attrs or \
                    attrs.get("keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
                raise refuse(node, "uses antialias, axes or keep_aspect_ratio_policy")
            drop |= {"antialias", "keep_aspect_ratio_policy"}
        elif node.op_type in ("ScatterElements", "ScatterND") and attrs.get("reduction") in (b"max", b"min"):
            raise refuse(node, "reduces with max or min")
        elif node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            raise refuse(node, "takes axes")
        elif node.op_type in ("BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad", "Col2Im",
                              "GroupNormalization", "Mish", "OptionalGetElement", "OptionalHasElement"):
            raise refuse(node, "is newer than opset 17 here")
        if drop:
            kept = [a for a in node.attribute if a.name not in drop]
            del node.attribute[:]
            node.attribute.extend(kept)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    if opset < 17:
        model = version_converter.convert_version(model, opset)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def count_size(model, example) -> dict[str, int]:
    """``{"macs", "params"}`` of ``model``: the MACs of its forward pass on ``example`` (one sample) and its
    parameters, counted as pruning counts them (:func:`edgeslim.components.transform.prune.count_macs_params`),
    so the figures of the report, the registry and the transform's before/after agree. Empty when the
    counter cannot run the model (the figures are reported, never gated on: they must not cost the export)."""
    from edgeslim.components.transform.prune import count_macs_params

    try:
        macs, params = count_macs_params(model, example)
    except Exception as exc:  # the counter's hooks meet what the exporter does not
        log.warning("MACs and parameters not counted (%s: %s)", type(exc).__name__, str(exc).splitlines()[0][:200]
                    if str(exc).strip() else "")
        return {}
    return {"macs": macs, "params": params}


def fixed_batch(path: str | Path) -> int | None:
    """The batch size an ONNX file's input is fixed at, or None when its batch axis is dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    for inp in graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and not dims[0].dim_param:
            return int(dims[0].dim_value)
    return None


def name_folded_weights(path: str | Path, model) -> dict[str, str]:
    """Give folded weights their parameter's name back, in the ONNX file ``path``.

    The exporter writes a Linear on a 3-D or 4-D input (a transformer's qkv/proj/MLP, ConvNeXt's
    channels-last MLP) as ``MatMul(x, W^T)`` and folds ``W^T`` into a new constant named like
    ``val_87``. Renamed to the parameter (``blocks.0.attn.qkv.weight``, still holding ``W^T``), the
    quantizer, the sensitivity table, ``float_layers`` carried across exports and QAT all find
    the layer by name, as they do for a Conv or Gemm weight. Returns ``{old name: new name}``.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    have = {i.name for i in graph.initializer}
    params: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and name not in have:
            params.setdefault((p.shape[1], p.shape[0]), []).append((name, p.detach().numpy()))
    rename: dict[str, str] = {}
    for init in graph.initializer:
        cands = params.get(tuple(init.dims)) if len(init.dims) == 2 else None
        if not cands:
            continue
        value = numpy_helper.to_array(init)
        for name, w in cands:
            if name not in have and name not in rename.values() and np.array_equal(value, w.T):
                rename[init.name] = name
                break
    if not rename:
        return rename
    for init in graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    onnx.save(proto, str(path))
    return rename


def run_onnx(path: str | Path, x: np.ndarray, *, basic: bool = True, threads: int = 0) -> np.ndarray:
    """Run an ONNX file on ``x`` with ONNX Runtime (CPU); outputs joined along axis 1. A numpy ``x``
    runs in one batch; a lazy split in batches of 256, read as they run."""
    batch = max(len(x), 1) if isinstance(x, np.ndarray) else 256
    return run_batched(make_session(path, basic=basic, threads=threads), x, batch=batch)
