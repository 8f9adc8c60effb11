"""What each TensorRT release's ONNX parser accepts: the opset range and the operators it parses.

An engine build fails on the build node when the Q/DQ ONNX uses an opset or an operator the
node's TensorRT cannot parse. A device class admits a range of TensorRT releases
(``DeviceClass.tensorrt_versions``), so ``engine plan`` checks the ONNX against every release of
the range here, without TensorRT.

The operator lists are onnx-tensorrt's ``docs/operators.md`` (operators marked supported) on its
``release/8.5-GA``, ``release/8.6-GA`` and ``release/10.0-GA`` branches; ``release/10.1-GA`` lists
the same as 10.0. Later releases only add operators, so a release newer than the last recorded
table is checked against that table: the check may refuse an operator a newer release gained,
never accept one it lacks. The opset ceilings are the ones those tables state (8.5 and 8.6: 17;
10.0: 9 to 20); later 10.x and 11.0-11.4 are held to 20, the highest recorded for a release before
them (TensorRT 11's opset guide gives 25 for its newest release, not for each 11.x).

Imports only ``onnx`` (inside :func:`graph_ops`), so the device agent can use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from edgeslim.components.engine.devices import TENSORRT_RELEASES, version_tuple

# onnx-tensorrt release/8.5-GA docs/operators.md, the operators marked "Y".
_OPS_8_5 = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements",
    "GatherND", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "HardSigmoid", "HardSwish", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN",
    "LRN", "LSTM", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool",
    "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow",
    "QuantizeLinear", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape",
    "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK",
    "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
))
_OPS_8_6 = _OPS_8_5 | {"GroupNormalization", "IsInf", "LayerNormalization"}
_OPS_10_0 = _OPS_8_6 | {"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"}

# (first release, operators, lowest opset, highest opset), newest first: a release takes the first
# row at or below it.
_TABLE = (
    ("10.0", _OPS_10_0, 9, 20),
    ("8.6", _OPS_8_6, 7, 17),
    ("8.5", _OPS_8_5, 7, 17),
)
# The domains TensorRT's parser reads without a plugin ("" and "ai.onnx" are the same domain).
ONNX_DOMAINS = ("", "ai.onnx")


def _row(version: str):
    v = version_tuple(version)
    for first, ops, lo, hi in _TABLE:
        if v >= version_tuple(first):
            return first, ops, lo, hi
    return None


def recorded(version: str) -> bool:
    """Whether this module knows what TensorRT ``version``'s parser accepts (8.5 or newer)."""
    return _row(version) is not None


def opset_range(version: str) -> tuple[int, int]:
    """``(lowest, highest)`` default-domain opset TensorRT ``version`` parses."""
    row = _row(version)
    if row is None:
        raise ValueError(f"TensorRT {version}: no parser table recorded (8.5 or newer)")
    return row[2], row[3]


def supported_ops(version: str) -> frozenset[str]:
    """The ONNX operators TensorRT ``version``'s parser supports."""
    row = _row(version)
    if row is None:
        raise ValueError(f"TensorRT {version}: no parser table recorded (8.5 or newer)")
    return row[1]


def first_release_with(op: str, versions: Iterable[str]) -> str | None:
    """The oldest of ``versions`` whose parser supports ``op``, or ``None``."""
    for v in sorted(versions, key=version_tuple):
        if recorded(v) and op in supported_ops(v):
            return v
    return None


def graph_ops(path: str | Path) -> tuple[int, set[tuple[str, str]]]:
    """The default-domain opset and every ``(domain, op_type)`` of an ONNX file, subgraphs included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
    found: set[tuple[str, str]] = set()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            found.add((node.domain if node.domain not in ONNX_DOMAINS else "", node.op_type))
            for attr in node.attribute:  # If/Loop/Scan bodies
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return opset, found


def parser_problem(name: str, opset: int, ops: set[tuple[str, str]], device_class: str,
                   versions: tuple[str, ...]) -> str | None:
    """Why some TensorRT release of ``versions`` cannot parse the ONNX ``name``, in one line; ``None`` if all can.

    Args:
        name: the ONNX file's name, for the message.
        opset: its default-domain opset.
        ops: its ``(domain, op_type)`` pairs (:func:`graph_ops`).
        device_class: the class whose build nodes have ``versions``.
        versions: the TensorRT releases a build node of the class may have.
    """
    from edgeslim.components.engine.devices import releases_label

    known = [v for v in versions if recorded(v)]
    if not known:
        return None  # an in-house class on a TensorRT this table does not know: its parser decides
    foreign = sorted(f"{op} ({domain})" for domain, op in ops if domain)
    if foreign:
        return (f"{name} has {', '.join(foreign[:4])}, outside the ONNX domain: TensorRT's ONNX parser reads "
                f"those only through a plugin, which {device_class}'s build nodes do not have; export without "
                "them (ONNX Runtime contrib ops come from its transformers optimizer or QOperator quantization)")
    too_new = [v for v in known if opset > opset_range(v)[1]]
    if too_new:
        top = min(opset_range(v)[1] for v in known)
        return (f"{name} is opset {opset}, and TensorRT {releases_label(too_new)} (device class {device_class}) "
                f"parses opset {top} at most: export with export.opset: {top}, or leave export.opset unset and "
                "the export picks the highest opset every class in engines.device_classes parses")
    too_old = [v for v in known if opset < opset_range(v)[0]]
    if too_old:
        low = max(opset_range(v)[0] for v in known)
        return (f"{name} is opset {opset}, and TensorRT {releases_label(too_old)} (device class {device_class}) "
                f"parses opset {low} or newer: export with export.opset: {low} or newer")
    for v in known:
        missing = sorted(op for _, op in ops if op not in supported_ops(v))
        if missing:
            later = first_release_with(missing[0], releases_after(v))
            since = f"; TensorRT {later} parses {missing[0]}" if later else ""
            return (f"{name} has {', '.join(missing[:6])}, which TensorRT {v}'s ONNX parser does not support "
                    f"(device class {device_class}){since}: export the model without "
                    f"{'it' if len(missing) == 1 else 'them'}, or build for a class with a newer TensorRT")
    return None


def releases_after(version: str) -> tuple[str, ...]:
    """The releases of ``devices.TENSORRT_RELEASES`` newer than ``version``."""
    return tuple(v for v in TENSORRT_RELEASES if version_tuple(v) > version_tuple(version))
