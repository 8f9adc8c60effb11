"""quantize (PTQ): fp32 ONNX -> int8 Q/DQ ONNX that TensorRT consumes.

TensorRT's explicit quantization wants symmetric scales (zero point 0) and
per-channel weight scales on the output-channel axis. ONNX Runtime's
quantizer writes the Q/DQ graph; the activation ranges come from edgeslim's
own calibrators (:mod:`edgeslim.components.quantize.calibrate`) and reach ORT through
its calibration cache.
"""

from __future__ import annotations

import fnmatch
import itertools
import difflib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeslim.components.quantize import calibrate
from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import PTQQuantizeConfig
from edgeslim.components.common.onnx_runtime import session_with_outputs
from edgeslim.components.export import INPUT_NAME

log = logging.getLogger(__name__)
CALIB_BATCH = 64
# Bytes of intermediate tensors one calibration batch may hold (every float tensor is a probe output):
# a YOLOv8n at 640x640 has ~230 MB of them per image, so 64 images at once would need ~15 GB.
CALIB_MEMORY = 1 << 30
# placement "weighted": Q/DQ only on the inputs of these (TensorRT's recommended placement)
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that apply a parameter elementwise or as a normalization. With a float constant of more than one
# element (a Linear's bias after its MatMul, LayerNorm's gamma and beta, ConvNeXt's layer-scale gamma,
# a ViT's position embedding), ONNX Runtime's quantizer would turn that constant into int8 with one
# scale for the whole vector; those nodes stay float (parameter_nodes).
PARAMETER_OPS = ("Add", "Sub", "Mul", "Div", "LayerNormalization", "InstanceNormalization",
                 "GroupNormalization", "BatchNormalization")


def _float_tensors(model) -> list[str]:
    """Names of the graph input and every float node output (what may need a range)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    init = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape", "QuantizeLinear", "DequantizeLinear"):
            continue
        for o in node.output:
            if o and types.get(o) == onnx.TensorProto.FLOAT:
                names.append(o)
    return list(dict.fromkeys(names))


def resolve_float_layers(model, patterns: list[str]) -> list[str]:
    """Node names matched by ``patterns`` (exact names or fnmatch patterns)."""
    names = [n.name for n in model.graph.node if n.name]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, names, n=3)
            hint = f"close: {', '.join(close)}" if close else f"node names look like: {', '.join(names[:4])}"
            raise ConfigError(f"quantize.float_layers: {pat!r} matches no node of the ONNX graph; {hint}")
        out.extend(hits)
    return list(dict.fromkeys(out))


def parameter_nodes(model) -> list[str]:
    """Nodes that apply a float parameter of more than one element outside Conv/Gemm/MatMul
    (:data:`PARAMETER_OPS`): placement ``all`` keeps them float, as ``QuantizeBias: False`` keeps
    Conv and Gemm biases float. Only Conv/ConvTranspose/Gemm/MatMul weights become int8 (per
    channel); a bias, a normalization's affine parameters or a layer-scale gamma stay as trained,
    and TensorRT fuses them in higher precision. Their inputs and outputs are still quantized
    where another op consumes them. Scalar constants (GELU's 0.5, attention's scale) are exact
    in int8 and keep their Q/DQ."""
    import onnx
    from onnx import numpy_helper

    size = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = n.attribute[0].t
            if t.data_type == onnx.TensorProto.FLOAT:
                size[n.output[0]] = int(numpy_helper.to_array(t).size)
    return [n.name for n in model.graph.node
            if n.op_type in PARAMETER_OPS and n.name and any(size.get(i, 0) > 1 for i in n.input)]


# A Concat whose inputs' ranges differ by more than this keeps its output float: one int8 scale over
# both would leave the smaller input a handful of levels (a decoded detector's pixel boxes, amax
# ~640, beside its 0-1 class scores would round every score to 0 or 5).
MIXED_RANGE = 16.0


def mixed_range_concats(model, ranges: dict[str, float]) -> list[str]:
    """Concat nodes (placement ``all``) whose calibrated input ranges differ by more than
    :data:`MIXED_RANGE`: they stay float, and so does what they feed to the graph's outputs."""
    out = []
    for n in model.graph.node:
        amax = [ranges[i] for i in n.input if i in ranges and ranges[i] > 0]
        if n.op_type == "Concat" and n.name and len(amax) > 1 and max(amax) > MIXED_RANGE * min(amax):
            out.append(n.name)
    return out


def calibrate_ranges(model_path: Path, config: PTQQuantizeConfig, data: Splits) -> dict[str, float]:
    """Run the calibration set through the model and choose each tensor's amax."""
    import onnx

    model = onnx.load(str(model_path))
    names = _float_tensors(model)
    with session_with_outputs(model, names) as sess:
        out_names = [o.name for o in sess.get_outputs()]
        pick = [out_names.index(n) for n in names]

        def run(batch):
            outs = sess.run(None, {INPUT_NAME: batch})
            return [outs[i] for i in pick]

        rows = data.calibration_rows(config.num_samples, config.seed)
        first = np.ascontiguousarray(data.x_train[rows[:1]])
        held = [run(first)]  # sizes the batches, and is calibrated as the first of them
        per_image = sum(o.nbytes for o in held[0])
        size = int(min(CALIB_BATCH, max(1, CALIB_MEMORY // max(per_image, 1))))
        # Read a batch at a time: never more than one batch of intermediate tensors is held beside the
        # first image's, and every image is read and run once (calibrate.collect bins each batch as it
        # comes; the histograms' bin width is set by the first two batches, this image and `size` more).
        stats = calibrate.collect(lambda b: held.pop() if b is first else run(b), names,
                                  itertools.chain([first], _Rows(data.x_train, rows[1:], size)), config.num_bins,
                                  histograms=calibrate.needs_histogram(config.calibrator))
    return {n: calibrate.choose_amax(a, h, config.calibrator, config.percentile, top=top)
            for n, (a, h, top) in stats.items()}


class _Rows:
    """``x[rows]`` in batches of ``size``, each read while the one before it runs (one batch of images
    ahead, on a thread: decoding images overlaps inference and binning)."""

    def __init__(self, x, rows: np.ndarray, size: int):
        self.x, self.rows, self.size = x, rows, size

    def _read(self, k: int) -> np.ndarray:
        return np.ascontiguousarray(self.x[self.rows[k * self.size:(k + 1) * self.size]])

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        n = -(-len(self.rows) // self.size)
        with ThreadPoolExecutor(1, thread_name_prefix="edgeslim-calib-read") as pool:
            ahead = None
            for k in range(n):
                batch = ahead.result() if ahead is not None else self._read(k)
                ahead = pool.submit(self._read, k + 1) if k + 1 < n else None
                yield batch


def unquantized_outputs(path: str | Path) -> list[str]:
    """Graph outputs of a Q/DQ ONNX that carry no Q/DQ (their calibrated range is unused)."""
    import onnx

    g = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    return [o.name for o in g.output if producer.get(o.name) != "DequantizeLinear"]


def stored_bytes(path: str | Path) -> dict:
    """Where a Q/DQ ONNX's parameter bytes go: ``int8`` (quantized weights), ``zero_points`` (all zero; one
    byte per weight channel and per activation), and the float parameters by
    why they stay float -- ``scales`` (per-channel weight and activation scales, which DequantizeLinear
    needs), ``biases`` (Conv/Gemm biases: TensorRT adds them in higher precision and has no int32-bias
    Q/DQ path), ``normalization`` (affine parameters of a normalization, applied in float),
    ``elementwise`` (a parameter of more than one element that an Add/Sub/Mul/Div applies: a Linear's bias
    after its MatMul, a position embedding, a layer scale -- one int8 scale over the vector would round
    its small entries away), ``float_layers`` (the weights of weighted layers kept in float) and
    ``other``; and ``duplicate`` (bytes of initializers whose contents another one already holds)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    use: dict[str, tuple[str, int]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            use.setdefault(i, (n.op_type, k))
    out = dict.fromkeys(("int8", "zero_points", "scales", "biases", "normalization", "elementwise", "float_layers", "other",
                         "duplicate"), 0)
    seen: set[bytes] = set()
    for t in g.initializer:
        a = numpy_helper.to_array(t)
        key = a.dtype.str.encode() + a.tobytes()
        if a.size > 1 and key in seen:
            out["duplicate"] += a.nbytes
        seen.add(key)
        op, k = use.get(t.name, ("", 0))
        if a.dtype != np.float32:
            out["zero_points" if op in ("QuantizeLinear", "DequantizeLinear") and k == 2 else
                "int8" if a.dtype == np.int8 else "other"] += a.nbytes
            continue
        cause = ("scales" if op in ("QuantizeLinear", "DequantizeLinear") else
                 "biases" if op in ("Conv", "ConvTranspose", "Gemm") and k == 2 else
                 "float_layers" if op in WEIGHTED_OPS else
                 "normalization" if op.endswith("Normalization") else
                 "elementwise" if op in PARAMETER_OPS and a.size > 1 else "other")
        out[cause] += a.nbytes
    return out


def check_qdq(path: str | Path) -> dict:
    """Facts TensorRT cares about: Q/DQ count, zero points, per-channel weight axes."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    zps, per_channel, qdq = [], 0, 0
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        qdq += 1
        if len(n.input) > 2 and n.input[2]:
            t = inits.get(n.input[2]) or consts.get(n.input[2])
            if t is not None:
                zps.append(numpy_helper.to_array(t))
        scale = inits.get(n.input[1])
        if scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
            per_channel += 1
    return {
        "qdq_nodes": qdq,
        "per_channel_weights": per_channel,
        "zero_points_all_zero": bool(qdq) and all(np.all(z == 0) for z in zps),
    }


def correct_biases(qdq_path: Path, pre_model, config: PTQQuantizeConfig, data: Splits) -> dict:
    """Bias correction (:func:`edgeslim.components.quantize.bias.correct_bias`) of ``qdq_path`` in place,
    over ``config``'s calibration samples, in batches whose probed tensors hold at most :data:`CALIB_MEMORY`."""
    from edgeslim.components.quantize.bias import correct_bias

    return correct_bias(qdq_path, pre_model, data.x_train, data.calibration_rows(config.num_samples, config.seed),
                        INPUT_NAME, memory=CALIB_MEMORY, max_batch=CALIB_BATCH)


def calibrate_onnx(onnx_path: str | Path, config: PTQQuantizeConfig, data: Splits) -> dict[str, float]:
    """The per-tensor ranges :func:`quantize` would choose for ``onnx_path``.

    They depend on the graph, the calibrator settings and the calibration draw, never on
    ``float_layers``; a search that re-quantizes one graph many times (sensitivity,
    accuracy-aware fallback) calibrates once and passes them back as ``ranges=``.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(data.x_train) == 0:
        raise DataError("quantize: the train split is empty; calibration needs training samples")
    with tempfile.TemporaryDirectory(prefix="edgeslim-pre-") as tmp:
        pre = Path(tmp) / "model.pre.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        return calibrate_ranges(pre, config, data)


def quantize(onnx_path: str | Path, config: PTQQuantizeConfig, *, data: Splits,
             out_dir: str | Path, ranges: dict[str, float] | None = None) -> StageResult:
    """Post-training quantization to a symmetric, per-channel int8 Q/DQ ONNX.

    Args:
        onnx_path: the fp32 ONNX (from :func:`edgeslim.components.export.export`).
        config: calibrator, calibration size and layers kept in float.
        data: calibration draws from ``data.x_train`` only.
        out_dir: where ``model.int8.onnx`` and the calibration cache go.
        ranges: per-tensor amax from :func:`calibrate_onnx` with the same graph and
            calibrator settings; calibrates here when ``None``.

    Returns:
        ``StageResult`` whose model is the Q/DQ ONNX path; metrics hold the
        Q/DQ facts and the chosen per-tensor ranges.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    t0 = time.perf_counter()
    if len(data.x_train) == 0:
        raise DataError("quantize: the train split is empty; calibration needs training samples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pre = out_dir / "model.pre.onnx"
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    pre_model = onnx.load(str(pre))
    exclude = resolve_float_layers(pre_model, config.float_layers)
    parameters = parameter_nodes(pre_model) if config.placement == "all" else []
    if ranges is None:
        ranges = calibrate_ranges(pre, config, data)
    else:
        missing = sorted(set(_float_tensors(pre_model)) - set(ranges))
        if missing:
            raise ValueError(f"quantize: ranges= lacks {len(missing)} tensor(s) of this graph ({missing[:3]}); "
                             "they must come from calibrate_onnx() on the same ONNX")
        ranges = dict(ranges)
    mixed = mixed_range_concats(pre_model, ranges) if config.placement == "all" else []
    cache = out_dir / "calibration.json"
    tensors = TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.array(-a, dtype=np.float32), highest=np.array(a, dtype=np.float32))
        for n, a in ranges.items()
    })
    from onnxruntime.quantization.calibrate import save_tensors_data  # noqa: PLC0415

    save_tensors_data(tensors, cache)
    out = out_dir / "model.int8.onnx"
    quantize_static(
        str(pre), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=list(dict.fromkeys(exclude + parameters + mixed)) or None,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(WEIGHTED_OPS) if config.placement == "weighted" else None,
        extra_options={
            "ActivationSymmetric": True, "WeightSymmetric": True,
            # TensorRT fuses float biases itself and has no int32-bias Q/DQ path.
            "QuantizeBias": False,
            # "weighted": Q/DQ on the inputs of weighted ops, none on their outputs; TensorRT
            # fuses the following pointwise ops (SiLU, sigmoid) and runs them in higher precision.
            # "all": a MatMul's output is quantized where its consumer takes int8 (Softmax, the next
            # MatMul), not before a Linear's float bias Add (parameter_nodes): the value quantized
            # is the biased one, as for Conv and Gemm, and TensorRT fuses MatMul and bias.
            "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS) if config.placement == "weighted" else ["MatMul"],
        },
        calibration_cache_path=str(cache),
    )
    corrected = correct_biases(out, pre_model, config, data) if config.bias_correction else None
    facts = check_qdq(out)
    facts["stored_bytes"] = stored_bytes(out)
    if corrected is not None:
        facts["bias_correction"] = corrected
    (out_dir / "ranges.json").write_text(json.dumps(ranges, indent=1, sort_keys=True))
    return StageResult(
        model=out,
        metrics={
            "size_bytes": out.stat().st_size,
            "calibrator": config.calibrator,
            "calibration_samples": min(config.num_samples, len(data.x_train)),
            "float_layers": exclude,
            "placement": config.placement,
            # nodes applying a bias, a normalization's or a layer scale's parameters (parameter_nodes)
            "float_parameter_nodes": len(parameters),
            # Concats of tensors whose ranges differ by more than MIXED_RANGE (boxes beside scores)
            "float_mixed_range_concats": mixed,
            # outputs left in float (kept float, or placement "weighted"): their range is unused
            "float_outputs": unquantized_outputs(out),
            "ranges": {k: round(v, 6) for k, v in ranges.items()},
            **facts,
        },
        lineage={"quantize": config.to_json_dict(), "calibration_split": "train"},
        seconds=time.perf_counter() - t0,
    )
