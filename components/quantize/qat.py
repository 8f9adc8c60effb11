"""Quantization-aware training that ends in the same Q/DQ ONNX as PTQ.

How the fake-quant model stays faithful to the ONNX it exports:

1. PTQ (:func:`edgeslim.components.quantize.ptq.quantize`) quantizes the fp32 ONNX
   with the configured calibrator. Its Q/DQ graph says which tensors are
   quantized and with which scale.
2. The torch model is traced with ``torch.fx`` and its BatchNorms folded into
   the convs (as ONNX Runtime's pre-processing folds them). Every traced value
   is matched by *value* (on a calibration batch) to the ONNX tensors, so
   renamed nodes and reshapes don't matter. A fake quantizer with the ONNX
   scale goes after each traced value whose ONNX twin is quantized; each
   conv/linear whose ONNX weight is quantized gets per-channel symmetric fake
   quantization of its weight (max-abs scales, as the quantizer writes) and
   int32 rounding of its bias at ``input scale * weight scale``.
3. The folded weights are fine-tuned through the fake quantizers
   (straight-through estimator), optionally distilled from the fp32 parent.
4. The fine-tuned fp32 weights are exported and quantized again with the same
   PTQ config, and the fake-quant model is rebuilt from that final Q/DQ graph.
   Its accuracy and the ONNX Runtime accuracy of the export are both reported.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, DataError, SourceError
from edgeslim.components.common.accuracy import top1
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import OnnxExportConfig, QATQuantizeConfig

Progress = Callable[[int, int, float], None]
_MATCH_SAMPLES = 16
# Input values matched at most (16 8x8 digits; 3 images at 224x224x3): every traced tensor of the
# match run is kept, which for a 224x224 CNN is ~100 MB per image.
_MATCH_VALUES = 1 << 19


def match_samples(x: np.ndarray) -> int:
    """How many samples the torch-to-ONNX match runs on: up to 16, fewer for large inputs."""
    per = int(np.prod(x.shape[1:])) or 1
    return max(2, min(_MATCH_SAMPLES, _MATCH_VALUES // per))


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as QuantizeLinear does) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


class ActFakeQuant(nn.Module):
    """Symmetric per-tensor int8 fake quantization with a fixed scale (zero point 0)."""

    def __init__(self, scale: float, onnx_name: str = ""):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.onnx_name = onnx_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), 0, -128, 127)


class QuantLayer(nn.Module):
    """A (BatchNorm-folded) conv or linear whose weight is fake-quantized per output
    channel with max-abs scales, and whose bias is rounded to int32 at scale
    ``input scale * weight scale``: what the Q/DQ ONNX holds."""

    def __init__(self, layer: nn.Module, input_fq: ActFakeQuant | None):
        super().__init__()
        self.layer = layer
        self.input_fq = [input_fq]  # a list: shared with the graph, not a submodule of this one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        dims = tuple(range(1, w.dim()))
        amax = w.detach().abs().amax(dim=dims).clamp(min=1e-12)
        scale = (amax * 2.0 / 254.0).float()  # ORT's symmetric int8: (rmax - rmin) / (127 - -127)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)
        b = self.layer.bias
        if b is not None and self.input_fq[0] is not None:
            bscale = self.input_fq[0].scale * scale
            b = _ste_round(b / bscale) * bscale
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, wq, b)
        return self.layer._conv_forward(x, wq, b)


class FakeQuantModel(nn.Module):
    """The traced, BatchNorm-folded model with fake quantizers where the Q/DQ ONNX has them."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def fp32_model(self) -> nn.Module:
        """A copy with the trained (folded) weights and no fake quantization, for export."""
        gm = copy.deepcopy(self.graph)
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ActFakeQuant):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            elif isinstance(mod, QuantLayer):
                gm.add_submodule(node.target, mod.layer)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm.eval()


def qdq_plan(qdq_path: str | Path) -> tuple[dict[str, float], set[str]]:
    """From a Q/DQ ONNX: activation tensor -> scale, and the module names whose weights are quantized."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(qdq_path)).graph
    inits = {i.name: i for i in g.initializer}
    acts: dict[str, float] = {}
    weights: set[str] = set()
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            name = n.input[0]
            if name.endswith("_QuantizeLinear_Input"):  # a graph output renamed by the quantizer
                name = name[: -len("_QuantizeLinear_Input")]
            acts[name] = float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0])
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w = n.input[0].removesuffix("_quantized")
            if w.endswith(".weight"):
                weights.add(w[: -len(".weight")])
    return acts, weights


def _onnx_values(fp32_path: str | Path, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    import onnx

    from edgeslim.components.common.onnx_runtime import session_with_outputs
    from edgeslim.components.export import INPUT_NAME

    model = onnx.load(str(fp32_path))
    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in inputs]
    with session_with_outputs(model, wanted) as sess:
        got = sess.run(wanted, {INPUT_NAME: x})
    vals = dict(zip(wanted, got))
    for n in names:
        if n in inputs:
            vals[n] = x
    return vals


def _trace(model: nn.Module):
    from torch import fx

    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises several types for untraceable Python
        raise SourceError(
            f"QAT needs a torch.fx-traceable model ({type(exc).__name__}: {str(exc)[:140]}); "
            "use quantize method 'ptq' for this model"
        ) from None


def _hardswish(x):
    return x * nn.functional.hardsigmoid(x)


def _silu(x):
    return x * torch.sigmoid(x)


def _gelu(x):
    return x * (0.5 * (torch.erf(x / 1.4142135623730951) + 1.0))


def _attention(q, k, v):
    s = q.size(-1) ** -0.25
    return torch.softmax((q * s) @ (k.transpose(-2, -1) * s), dim=-1) @ v


def _attention_scaled(q, k, v, s):
    return torch.softmax((q * s) @ (k.transpose(-2, -1) * s), dim=-1) @ v


def _spelled_out(gm, node):
    """The function that writes ``node`` as the ONNX exporter does (opset 18), or None.

    The exporter writes Hardswish as HardSigmoid and Mul, SiLU as Sigmoid and Mul, exact GELU as
    Div, Erf, Add and two Muls, and scaled_dot_product_attention as (q * sqrt(scale)) @
    (k^T * sqrt(scale)), Softmax and a MatMul with v. Placement ``all`` quantizes those inner
    tensors (the attention MatMuls' inputs among them), so the traced graph needs them too.
    """
    f = nn.functional
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        fn = {nn.Hardswish: _hardswish, nn.SiLU: _silu, nn.GELU: _gelu}.get(type(mod))
        if fn is None or (fn is _gelu and mod.approximate != "none"):
            return None  # tanh-approximated GELU is left as it is
        return fn, node.args[:1]
    if node.op != "call_function":
        return None
    if node.target in (f.hardswish, f.silu) or (node.target is f.gelu and len(node.args) == 1
                                                 and node.kwargs.get("approximate", "none") == "none"):
        return {f.hardswish: _hardswish, f.silu: _silu, f.gelu: _gelu}[node.target], node.args[:1]
    if node.target is f.scaled_dot_product_attention:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        kw = {**dict(zip(names, node.args)), **node.kwargs}
        # an optional forward argument (timm's attn_mask=None, is_causal=False) is traced as a
        # placeholder that keeps its default: the model is called with its input alone
        kw = {k: (v.args[0] if isinstance(v, torch.fx.Node) and v.op == "placeholder" and v.args else v)
              for k, v in kw.items()}
        if kw.get("attn_mask") is not None or kw.get("dropout_p", 0.0) or kw.get("is_causal") or kw.get("enable_gqa"):
            return None  # masked, causal or dropout attention keeps its one node
        qkv = (kw["query"], kw["key"], kw["value"])
        if kw.get("scale") is None:
            return _attention, qkv
        return _attention_scaled, (*qkv, float(kw["scale"]) ** 0.5)
    return None


def spell_out_like_onnx(gm) -> int:
    """Rewrite, in the traced graph ``gm``, the ops the exporter writes as several ONNX ops into those
    same steps (:func:`_spelled_out`), so every tensor the Q/DQ ONNX quantizes has a torch twin.
    The values are the same; returns how many ops were rewritten."""
    from torch import fx

    done = 0
    for node in list(gm.graph.nodes):
        got = _spelled_out(gm, node)
        if got is None:
            continue
        fn, args = got
        sub = fx.symbolic_trace(fn)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with gm.graph.inserting_before(node):
            env = dict(zip(placeholders, args))
            out = gm.graph.graph_copy(sub.graph, env)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return done


def fake_quant_model(model: nn.Module, *, qdq_path: str | Path, fp32_path: str | Path,
                     x: np.ndarray) -> FakeQuantModel:
    """Build the fake-quant twin of the Q/DQ ONNX ``qdq_path`` around a copy of ``model``.

    Args:
        model: the fp32 torch model ``fp32_path`` was exported from.
        qdq_path: the Q/DQ ONNX whose quantized tensors and scales are copied.
        fp32_path: the fp32 ONNX the Q/DQ one was made from (same tensor names).
        x: a few input samples used to match torch values to ONNX tensors.
    """
    from torch.fx.experimental.optimization import fuse
    from torch.fx.interpreter import Interpreter

    # Fold BatchNorm as ONNX Runtime's pre-processing does, so weights and biases
    # quantize exactly as in the ONNX (BatchNorm stays folded while fine-tuning).
    gm = fuse(_trace(copy.deepcopy(model).eval()))
    spell_out_like_onnx(gm)
    acts, weights = qdq_plan(qdq_path)
    x = np.ascontiguousarray(x[:match_samples(x)])
    ref = _onnx_values(fp32_path, list(acts), x)
    by_size: dict[int, list[str]] = {}
    for name, v in ref.items():
        by_size.setdefault(v.size, []).append(name)

    seen: dict[str, torch.Tensor] = {}

    class Capture(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                # a copy: an in-place op further on (ResNet's `out += identity`, ReLU(inplace=True))
                # would otherwise change the value this node is matched by
                seen[n.name] = out.detach().clone()
            return out

    with torch.no_grad():
        Capture(gm).run(torch.from_numpy(x))

    ordered: dict[str, np.ndarray] = {}

    def sorted_ref(n: str) -> np.ndarray:
        if n not in ordered:
            ordered[n] = np.sort(ref[n].reshape(-1))
        return ordered[n]

    def tolerance(b: np.ndarray) -> float:
        return 1e-4 + 1e-4 * float(np.abs(b).max(initial=0.0))

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max(initial=0.0))

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return distance(a, b) <= tolerance(b)

    def summary(v: np.ndarray) -> np.ndarray:
        return np.array([v.min(initial=0.0), v.max(initial=0.0), np.abs(v).sum(dtype=np.float64)])

    # Largest, smallest and summed |x| of every ONNX tensor: equal values (in any order) agree on
    # them within the tolerance, so only those candidates are compared element by element (a ViT has
    # dozens of same-sized tensors; comparing every pair in full takes minutes).
    stats = {n: summary(v.reshape(-1)) for n, v in ref.items()}

    def plausible(cands: list[str], flat: np.ndarray) -> list[str]:
        tol, mine = tolerance(flat), summary(flat)
        bound = np.array([tol, tol, tol * flat.size])
        return [n for n in cands if np.all(np.abs(stats[n] - mine) <= bound)]

    used: set[str] = set()
    plan: list[tuple[object, str]] = []
    for node in list(gm.graph.nodes):
        val = seen.get(node.name)
        if val is None or node.op == "output":
            continue
        flat = val.reshape(-1).numpy()
        cands = plausible(by_size.get(flat.size, []), flat)
        tol = tolerance(flat)
        dist = {n: distance(ref[n].reshape(-1), flat) for n in cands}
        hits = [n for n in cands if dist[n] <= tol]
        if not hits and cands:
            # The same values in another layout: the exporter's transpose optimiser slices q, k and v
            # out of a fused qkv before permuting them. Quantization is elementwise, so a fake
            # quantizer on the torch tensor is the ONNX one on its permutation.
            flat_sorted = np.sort(flat)
            dist = {n: distance(sorted_ref(n), flat_sorted) for n in cands}
            hits = [n for n in cands if dist[n] <= tol]
        if not hits:
            continue
        # The nearest twins first: residual streams whose update is still tiny (ConvNeXt's layer
        # scale starts at 1e-6) are within the tolerance of each other, and an identity module
        # (a shortcut) repeats a value exactly. Among equally near twins, equal values along a
        # reshape chain share a scale: prefer a same-shape, unused one.
        near = max(10.0 * min(dist[n] for n in hits), 1e-7 * tol)
        hits.sort(key=lambda n: (dist[n] > near, tuple(ref[n].shape) != tuple(val.shape), n in used, dist[n]))
        used.add(hits[0])
        plan.append((node, hits[0]))
    missing = set(acts) - used
    # An ONNX tensor with no torch node of its own (a copy or permutation the exporter adds, e.g.
    # HardSwish's input to its HardSigmoid) is quantized by its twin's fake quantizer when it holds
    # the same values with the same scale: quantizing twice at one scale is quantizing once.
    for name in sorted(missing):
        if any(plausible([name], sorted_ref(u)) and np.isclose(acts[u], acts[name], rtol=1e-6, atol=0)
               and close(sorted_ref(u), sorted_ref(name)) for u in used if ref[u].size == ref[name].size):
            missing.discard(name)
    if missing:
        raise SourceError(
            f"QAT could not find torch values for quantized ONNX tensors {sorted(missing)[:4]}; "
            "the model's ONNX export differs from its torch graph; use quantize method 'ptq'"
        )
    for i, (node, name) in enumerate(plan):
        mod_name = f"act_fq_{i}"
        gm.add_submodule(mod_name, ActFakeQuant(acts[name], name))
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_module(mod_name, args=(node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in weights:
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        src = node.args[0]
        in_fq = gm.get_submodule(src.target) if getattr(src, "op", "") == "call_module" and \
            isinstance(gm.get_submodule(src.target), ActFakeQuant) else None
        gm.add_submodule(node.target, QuantLayer(layer, in_fq))
    gm.recompile()
    return FakeQuantModel(gm).eval()


def _onnx_against_torch(onnx_path: str | Path, model: nn.Module | None, x, y) -> dict[str, float]:
    """The top-1 (%) of an ONNX classifier (Q/DQ semantics) on ``x``, and, with ``model``, the torch
    classifier's top-1 and the SQNR (dB) of its logits against the ONNX ones: one pass over ``x``, each
    batch read once for both, correct counts and signal and noise powers summed per batch (no logits over
    the split are held)."""
    from edgeslim.components.common.onnx_runtime import SqnrAccumulator, make_session, stream_batches

    session, y = make_session(onnx_path), np.asarray(y)
    feed = session.get_inputs()[0].name
    right, sqnr = [0, 0], SqnrAccumulator()
    if model is not None:
        model.eval()
    with torch.no_grad():
        for start, rows in stream_batches(x):
            labels = y[start:start + len(rows)]
            ort = session.run(None, {feed: rows})[0]
            right[0] += int((ort.argmax(1) == labels).sum())
            if model is not None:
                fq = model(torch.from_numpy(rows)).numpy()
                right[1] += int((fq.argmax(1) == labels).sum())
                sqnr.add(ort, fq)
    n = max(len(y), 1)
    out = {"onnx_top1": right[0] * 100.0 / n}
    if model is not None:
        out.update(torch_top1=right[1] * 100.0 / n, sqnr_db=sqnr.db())
    return out


def _weighted_float_layers(qdq_path: str | Path) -> set[str]:
    """Torch module names of the conv/linear layers a Q/DQ ONNX left in float (their weight is still a
    plain initializer, not the output of a DequantizeLinear)."""
    from edgeslim.components.quantize.sensitivity import quantizable_layers

    return {r["layer"] for r in quantizable_layers(qdq_path)}


def check_float_layers(pre_onnx: str | Path, patterns: list[str], placement: str) -> None:
    """QAT re-exports the trained model, whose nodes are named anew, and carries float layers over by
    their weights' names: with placement ``all`` every float pattern must name conv/linear nodes.

    Raises:
        ConfigError: a pattern names a node without weights (one line, with the fix).
    """
    if not patterns or placement == "weighted":  # weighted placement quantizes only weighted layers' inputs
        return
    import onnx

    from edgeslim.components.quantize.ptq import resolve_float_layers
    from edgeslim.components.quantize.sensitivity import quantizable_layers

    weighted = {r["node"] for r in quantizable_layers(pre_onnx)}
    unmapped = [n for n in resolve_float_layers(onnx.load(str(pre_onnx)), patterns) if n not in weighted]
    if unmapped:
        raise ConfigError(
            f"quantize(qat).float_layers: {unmapped[:3]} are not conv/linear nodes; QAT keeps "
            "float only layers with weights: name conv/gemm nodes (or use method: ptq)"
        )


@dataclasses.dataclass
class QATRun:
    """What :func:`qat_chain` made, for the task's own figures."""

    ptq: StageResult  # the PTQ whose ranges initialised the fake quantizers
    twin: nn.Module  # the fake-quant model, fine-tuned
    tuned: nn.Module  # its trained weights as a plain fp32 model (what was exported again)
    qdq: Path  # ``model.int8.onnx``: the tuned model quantized again
    final: StageResult  # the PTQ that made ``qdq``
    final_pre: Path  # its pre-processed fp32 ONNX (the tensor names of ``qdq``)


def qat_chain(model: nn.Module, ptq_config, *, data: Splits, out_dir: Path, export_config: OnnxExportConfig,
              fp32_onnx: str | Path | None, twin: Callable[[nn.Module, Path, Path], nn.Module],
              train: Callable[[nn.Module], None], plain: Callable[[nn.Module], nn.Module]) -> QATRun:
    """The one QAT chain every task runs; the task gives how its fake-quant twin is built and trained.

    1. export ``model`` (unless ``fp32_onnx`` is given) and quantize it with ``ptq_config``;
    2. ``twin(model, ptq Q/DQ ONNX, its pre-processed fp32 ONNX)``: the fake-quant model with those scales;
    3. ``train(twin)`` fine-tunes it in place;
    4. ``plain(twin)``: its trained weights without fake quantization, exported again;
    5. quantized again with the same config (ranges re-calibrated on the trained weights); the conv/linear
       layers PTQ left in float are carried over by their weights' names, as the export names nodes anew.
    """
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.quantize.sensitivity import preprocessed, quantizable_layers

    out_dir.mkdir(parents=True, exist_ok=True)
    if fp32_onnx is None:
        fp32_onnx = export(model, export_config, data=data, out_path=out_dir / "start.fp32.onnx").model
    ptq = quantize(fp32_onnx, ptq_config, data=data, out_dir=out_dir / "ptq")
    check_float_layers(out_dir / "ptq" / "model.pre.onnx", list(ptq_config.float_layers), ptq_config.placement)
    fq = twin(model, Path(ptq.model), out_dir / "ptq" / "model.pre.onnx")
    train(fq)
    tuned = plain(fq)
    tuned_onnx = export(tuned, export_config, data=data, out_path=out_dir / "qat.fp32.onnx").model
    float_layers = _weighted_float_layers(ptq.model)
    by_layer = {r["layer"]: r["node"] for r in quantizable_layers(preprocessed(tuned_onnx, out_dir / "qat.pre.onnx"))}
    final_cfg = dataclasses.replace(ptq_config, float_layers=[by_layer[m] for m in sorted(float_layers)
                                                              if m in by_layer])
    final = quantize(tuned_onnx, final_cfg, data=data, out_dir=out_dir / "final")
    qdq = out_dir / "model.int8.onnx"
    qdq.write_bytes(Path(final.model).read_bytes())
    return QATRun(ptq, fq, tuned, qdq, final, out_dir / "final" / "model.pre.onnx")


def qat(model: nn.Module, config: QATQuantizeConfig, *, data: Splits | None, out_dir: str | Path,
        fp32_onnx: str | Path | None = None, teacher: nn.Module | None = None,
        export_config: OnnxExportConfig | None = None, progress: Progress | None = None
        ) -> StageResult:
    """Quantization-aware fine-tuning, exported as a symmetric per-channel Q/DQ ONNX.

    Args:
        model: the fp32 torch model (not changed).
        config: PTQ settings that initialise the ranges, and the fine-tuning settings.
        data: training split for fine-tuning and calibration; test split for metrics.
        out_dir: where ``model.int8.onnx`` (and intermediate files) go.
        fp32_onnx: ``model`` already exported; exported here when None.
        teacher: distilled from when ``config.distill`` (default: ``model`` itself).
        export_config: ONNX export settings (default ``OnnxExportConfig()``).
        progress: called with (epoch, epochs, loss).

    Returns:
        StageResult whose model is the Q/DQ ONNX path; metrics hold the top-1 of
        the PTQ start, of the fake-quant model and of the ONNX Runtime export.

    Raises:
        DataError: there is no training data.
    """
    from edgeslim.components.transform.train import TrainConfig, augmentation, fit
    start = time.perf_counter()
    if data is None or len(data.x_train) == 0 or len(data.y_train) == 0:
        raise DataError(
            "quantize(qat): no training data; QAT fine-tunes the model, so give a data provider "
            "with a non-empty train split (or use method: ptq)"
        )
    calib = data.calibration(match_samples(data.x_train[:1]), config.seed)
    kd = copy.deepcopy(teacher if teacher is not None else model).eval() if config.distill else None
    figures: dict[str, float] = {}

    def twin(m: nn.Module, qdq_path: Path, pre: Path) -> nn.Module:
        figures["ptq_top1_test"] = _onnx_against_torch(qdq_path, None, data.x_test, data.y_test)["onnx_top1"]
        fq = fake_quant_model(m, qdq_path=qdq_path, fp32_path=pre, x=calib)
        figures["fake_quant_top1_test_start"] = top1(fq, data.x_test, data.y_test)
        return fq

    def train(fq: nn.Module) -> None:
        fit(fq, TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, schedule="cosine",
                            weight_decay=0.0, temperature=config.temperature, alpha=config.alpha, seed=config.seed,
                            augment=augmentation(config.augment), recalibrate_batchnorm=False),
            x=data.x_train, y=data.y_train, teacher=kd, progress=progress)

    run = qat_chain(model, config.ptq(), data=data, out_dir=Path(out_dir), export_config=export_config or
                    OnnxExportConfig(), fp32_onnx=fp32_onnx, twin=twin, train=train, plain=lambda fq: fq.fp32_model())
    qdq, final, ptq_top1, fq_start = run.qdq, run.final, figures["ptq_top1_test"], figures["fake_quant_top1_test_start"]
    fq_final = fake_quant_model(run.tuned, qdq_path=qdq, fp32_path=run.final_pre, x=calib)
    test = _onnx_against_torch(qdq, fq_final, data.x_test, data.y_test)
    fq_top1, ort_top1 = test["torch_top1"], test["onnx_top1"]
    metrics = {
        **{k: v for k, v in final.metrics.items() if k != "ranges"},
        "size_bytes": qdq.stat().st_size,
        "ptq_top1_test": ptq_top1,
        "fake_quant_top1_test_start": fq_start,
        "fake_quant_top1_test": fq_top1,
        "onnx_top1_test": ort_top1,
        "fake_quant_vs_onnx_pt": abs(fq_top1 - ort_top1),
        # how faithfully the trained twin computes what ONNX Runtime runs (inf: identical)
        "fake_quant_vs_onnx_sqnr_db": round(test["sqnr_db"], 3),
        "qat_epochs": config.epochs,
    }
    lineage = {"stage": "quantize", "method": "qat", "placement": config.placement, "config": config.to_json_dict(),
               "calibration_split": "train", "distilled_from": "fp32 parent" if kd is not None else None,
               "data_digest": data.digest()}
    return StageResult(qdq, metrics, lineage, time.perf_counter() - start)
