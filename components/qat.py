"""Quantization-aware training that ends in the same Q/DQ ONNX as PTQ.

How the fake-quant model stays faithful to the ONNX it exports:

1. PTQ (:func:`edgeslim.components.quantize.quantize`) quantizes the fp32 ONNX
   with the configured calibrator. Its Q/DQ graph says which tensors are
   quantized and with which scale.
2. The torch model is traced with ``torch.fx``; every traced value is matched
   by *value* (on a calibration batch) to the ONNX tensors, so BatchNorm
   folding, renamed nodes and reshapes don't matter. A fake quantizer with the
   ONNX scale goes after each traced value whose ONNX twin is quantized, and
   each conv/linear whose ONNX weight is quantized gets per-channel symmetric
   fake quantization of its weight (max-abs scales, as the quantizer writes;
   per-channel scales commute with BatchNorm folding, so unfolded weights
   quantize the same).
3. The weights are fine-tuned through the fake quantizers (straight-through
   estimator), BatchNorm frozen, optionally distilled from the fp32 parent.
4. The fine-tuned fp32 weights are exported and quantized again with the same
   PTQ config, and the fake-quant model is rebuilt from that final Q/DQ graph.
   Its accuracy and the ONNX Runtime accuracy of the export are both reported.
"""

from __future__ import annotations

import copy
import operator
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .common.data import Splits
from .common.errors import DataError, SourceError
from .common.reference import top1
from .common.result import StageResult
from .common.stage_configs import OnnxExportConfig, QATQuantizeConfig

Progress = Callable[[int, int, float], None]
_MATCH_SAMPLES = 16


class WeightFakeQuant(nn.Module):
    """Parametrization: symmetric per-output-channel int8 fake quantization of a weight."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        amax = w.detach().abs().amax(dim=dims).clamp(min=1e-12)
        scale = (amax * 2.0 / 254.0).float()  # ORT's symmetric int8: (rmax - rmin) / (127 - -127)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)


class ActFakeQuant(nn.Module):
    """Symmetric per-tensor int8 fake quantization with a fixed scale (zero point 0)."""

    def __init__(self, scale: float, onnx_name: str = ""):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.onnx_name = onnx_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), 0, -128, 127)


class FakeQuantModel(nn.Module):
    """The traced model with fake quantizers; BatchNorm stays frozen in training
    mode, so the unfolded weights keep quantizing like the folded ONNX ones."""

    def __init__(self, graph_module: nn.Module, base: nn.Module):
        super().__init__()
        self.graph = graph_module
        self.base = base  # shares parameters with graph; the fp32 weights to export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "FakeQuantModel":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def parameters(self, recurse: bool = True):
        return self.base.parameters(recurse)

    def fp32_model(self) -> nn.Module:
        """A copy of the trained weights without fake quantization."""
        from torch.nn.utils import parametrize

        out = copy.deepcopy(self.base)
        for m in out.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return out.eval()


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

    from .export import INPUT_NAME, make_session

    model = onnx.load(str(fp32_path))
    outs = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in inputs]
    for n in wanted:
        if n not in outs:
            model.graph.output.append(onnx.helper.ValueInfoProto(name=n))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeslim-qat-") as tmp:
        p = Path(tmp) / "aug.onnx"
        onnx.save(model, str(p))
        sess = make_session(p, basic=True)
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


def fake_quant_model(model: nn.Module, *, qdq_path: str | Path, fp32_path: str | Path,
                     x: np.ndarray) -> FakeQuantModel:
    """Build the fake-quant twin of the Q/DQ ONNX ``qdq_path`` around a copy of ``model``.

    Args:
        model: the fp32 torch model ``fp32_path`` was exported from.
        qdq_path: the Q/DQ ONNX whose quantized tensors and scales are copied.
        fp32_path: the fp32 ONNX the Q/DQ one was made from (same tensor names).
        x: a few input samples used to match torch values to ONNX tensors.
    """
    from torch.fx.interpreter import Interpreter
    from torch.nn.utils import parametrize

    base = copy.deepcopy(model).eval()
    gm = _trace(base)
    acts, weights = qdq_plan(qdq_path)
    x = np.ascontiguousarray(x[:_MATCH_SAMPLES])
    ref = _onnx_values(fp32_path, list(acts), x)
    by_size: dict[int, list[str]] = {}
    for name, v in ref.items():
        by_size.setdefault(v.size, []).append(name)

    seen: dict[str, torch.Tensor] = {}

    class Capture(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                seen[n.name] = out.detach()
            return out

    with torch.no_grad():
        Capture(gm).run(torch.from_numpy(x))

    used: set[str] = set()
    plan: list[tuple[object, str]] = []
    for node in list(gm.graph.nodes):
        val = seen.get(node.name)
        if val is None:
            continue
        flat = val.reshape(-1).numpy()
        tol = 1e-4 + 1e-4 * float(np.abs(flat).max(initial=0.0))
        hits = [n for n in by_size.get(flat.size, [])
                if np.allclose(ref[n].reshape(-1), flat, atol=tol, rtol=0)]
        if not hits:
            continue
        # Equal values along reshape chains share a scale; prefer a same-shape, unused twin.
        hits.sort(key=lambda n: (tuple(ref[n].shape) != tuple(val.shape), n in used))
        used.add(hits[0])
        plan.append((node, hits[0]))
    missing = set(acts) - used
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
    gm.recompile()
    modules = dict(base.named_modules())
    for name in weights:
        m = modules.get(name)
        if m is not None and isinstance(getattr(m, "weight", None), nn.Parameter):
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
    return FakeQuantModel(gm, base).eval()


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
    from .distill import fit
    from .evaluate import top1_percent
    from .export import export, run_onnx
    from .quantize import quantize

    start = time.perf_counter()
    if data is None or len(data.x_train) == 0 or len(data.y_train) == 0:
        raise DataError(
            "quantize(qat): no training data; QAT fine-tunes the model, so give a data provider "
            "with a non-empty train split (or use method: ptq)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_config = export_config or OnnxExportConfig()
    if fp32_onnx is None:
        fp32_onnx = export(model, export_config, data=data, out_path=out_dir / "start.fp32.onnx").model
    ptq = quantize(fp32_onnx, config.ptq(), data=data, out_dir=out_dir / "ptq")
    ptq_top1 = top1_percent(run_onnx(ptq.model, data.x_test), data.y_test)
    calib = data.calibration(_MATCH_SAMPLES, config.seed)
    fq = fake_quant_model(model, qdq_path=ptq.model, fp32_path=out_dir / "ptq" / "model.pre.onnx", x=calib)
    fq_start = top1(fq, data.x_test, data.y_test)
    kd = copy.deepcopy(teacher if teacher is not None else model).eval() if config.distill else None
    fit(fq, x=data.x_train, y=data.y_train, teacher=kd, epochs=config.epochs, lr=config.lr,
        batch_size=config.batch_size, schedule="cosine", weight_decay=0.0,
        temperature=config.temperature, alpha=config.alpha, seed=config.seed, progress=progress)
    tuned = fq.fp32_model()
    fp32_tuned = export(tuned, export_config, data=data, out_path=out_dir / "qat.fp32.onnx").model
    final = quantize(fp32_tuned, config.ptq(), data=data, out_dir=out_dir / "final")
    qdq = out_dir / "model.int8.onnx"
    qdq.write_bytes(Path(final.model).read_bytes())
    fq_final = fake_quant_model(tuned, qdq_path=qdq, fp32_path=out_dir / "final" / "model.pre.onnx", x=calib)
    fq_top1 = top1(fq_final, data.x_test, data.y_test)
    ort_top1 = top1_percent(run_onnx(qdq, data.x_test), data.y_test)
    metrics = {
        **{k: v for k, v in final.metrics.items() if k != "ranges"},
        "size_bytes": qdq.stat().st_size,
        "ptq_top1_test": ptq_top1,
        "fake_quant_top1_test_start": fq_start,
        "fake_quant_top1_test": fq_top1,
        "onnx_top1_test": ort_top1,
        "fake_quant_vs_onnx_pt": abs(fq_top1 - ort_top1),
        "qat_epochs": config.epochs,
    }
    lineage = {"stage": "quantize", "method": "qat", "config": config.to_json_dict(),
               "calibration_split": "train", "distilled_from": "fp32 parent" if kd is not None else None,
               "data_digest": data.digest()}
    return StageResult(qdq, metrics, lineage, time.perf_counter() - start)
