"""Quantization-aware training for detectors, without labels or graph tracing.

The classifier QAT (:mod:`edgeslim.components.quantize.qat`) rebuilds the exported graph with ``torch.fx`` and
trains with the classification loss. Detectors defeat both: YOLO's C2f splits a
tensor into a Python list (not traceable), and a detector's training loss belongs
to its author. So this QAT:

- quantizes with ``placement: weighted`` (Q/DQ only on the inputs of convs, as
  TensorRT recommends), where every quantized tensor is the input of a conv module,
  so wrapping each conv module reproduces the Q/DQ ONNX without tracing;
- folds BatchNorm into the conv before it, as ONNX Runtime's pre-processing does;
- fine-tunes the fake-quant model to reproduce the fp32 model's raw outputs (the
  box and class maps) on training images: label-free output distillation;
- exports the tuned weights and quantizes them again (ranges re-calibrated).
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
from edgeslim.components.common.errors import DataError, SourceError
from edgeslim.components.common.result import StageResult
from edgeslim.components.quantize.qat import ActFakeQuant, QuantLayer
from edgeslim.components.transform.yolo import training_outputs

Progress = Callable[[int, int, float], None]


def conv_input_scales(qdq_path: str | Path) -> dict[str, float]:
    """Torch module name -> scale of its quantized input, for every conv of a Q/DQ ONNX
    whose input and weight are quantized (the module name comes from the weight's name)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(qdq_path)).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out: dict[str, float] = {}
    for n in g.node:
        if n.op_type != "Conv":
            continue
        dq_x, dq_w = producer.get(n.input[0]), producer.get(n.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        weight = dq_w.input[0].removesuffix("_quantized")
        if not weight.endswith(".weight"):
            continue
        out[weight[: -len(".weight")]] = float(numpy_helper.to_array(inits[dq_x.input[1]]).reshape(-1)[0])
    return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with each BatchNorm folded into the conv right before it in an ``nn.Sequential``, or
    into its block's ``conv`` in a conv/bn/act block (:func:`_fold_wrapper`).

    Raises:
        SourceError: a BatchNorm does not follow a conv that way (its folded weights
            could not match the ONNX ones).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    for block in list(model.modules()):
        _fold_wrapper(block, fuse_conv_bn_eval)
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise SourceError(f"QAT for detectors folds BatchNorm into the conv before it (in an nn.Sequential or a "
                          f"conv/bn/act block); {left[0]!r} is not placed that way; use quantize method ptq/auto with qat: false")
    return model


def _fold_wrapper(block: nn.Module, fuse) -> None:
    """Fold a conv-norm-activation wrapper's ``bn`` into its ``conv`` (Ultralytics' and timm's ``Conv``:
    children ``conv``, ``bn``, ``act``; a wrapper already fused has no ``bn``), kept only when the block
    gives the same output on a random input."""
    conv, bn = block._modules.get("conv"), block._modules.get("bn")
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features):
        return
    x = torch.randn(2, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            want = block(x)
            block._modules["conv"], block._modules["bn"] = fuse(conv, bn), nn.Identity()
            same = torch.allclose(block(x), want, rtol=1e-4, atol=1e-4)
    except Exception:  # its forward is no conv-then-norm of its input
        same = False
    if not same:
        block._modules["conv"], block._modules["bn"] = conv, bn


class _QuantConv(nn.Module):
    """A conv whose input and weight are fake-quantized as the weighted-placement ONNX holds them."""

    def __init__(self, conv: nn.Module, scale: float, name: str):
        super().__init__()
        self.fq = ActFakeQuant(scale, name)
        self.q = QuantLayer(conv, self.fq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(self.fq(x))


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fake_quant_detector(model: nn.Module, qdq_path: str | Path) -> nn.Module:
    """The BatchNorm-folded copy of ``model`` with its convs fake-quantized as in ``qdq_path``."""
    fq = fold_batchnorm(model)
    convs = {n for n, m in fq.named_modules() if isinstance(m, nn.Conv2d)}
    # A model exported through a wrapper (one whose forward returns auxiliaries beside its tensors:
    # model_outputs.exportable) has its weights named one module deeper: drop the wrapper's name.
    scales = {n if n in convs or n.partition(".")[2] not in convs else n.partition(".")[2]: v
              for n, v in conv_input_scales(qdq_path).items()}
    unknown = sorted(set(scales) - convs)
    if unknown:
        raise SourceError(f"QAT: the Q/DQ ONNX quantizes weights {unknown[:3]} that are no conv of the torch "
                          "model; the export renamed them; use quantize method ptq/auto with qat: false")
    for name, scale in scales.items():
        _swap(fq, name, _QuantConv(fq.get_submodule(name), scale, name))
    return fq.eval()


def without_fake_quant(model: nn.Module) -> nn.Module:
    """A copy with the (trained, folded) convs back in place of their fake-quant wrappers."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, _QuantConv):
            _swap(out, name, m.q.layer)
    return out.eval()


def _dict_tensors(d: dict) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in d.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out += _dict_tensors(v)
    return out


def raw_outputs(o) -> list[torch.Tensor]:
    """The tensors a forward's return value is matched on: the raw head values a forward returns in a
    dict when it has one (Ultralytics: box distributions and class logits, alone in training mode,
    beside the decoded output in eval), else its top-level tensors (the reference's map pairs)."""
    if isinstance(o, dict):
        return _dict_tensors(o)
    if isinstance(o, (tuple, list)):
        dicts = [v for v in o if isinstance(v, dict)]
        return [t for d in dicts for t in _dict_tensors(d)] if dicts else [v for v in o if isinstance(v, torch.Tensor)]
    return [o]


def output_matching_loss(student, teacher, _labels) -> torch.Tensor:
    """Mean squared error per raw output (:func:`raw_outputs`), each normalised by the teacher output's
    power, so the small sigmoid score maps weigh as much as the box maps.

    Raises:
        SourceError: student and teacher return different numbers of raw outputs.
    """
    s_out, t_out = raw_outputs(student), raw_outputs(teacher)
    if len(s_out) != len(t_out):
        raise SourceError(f"output matching: the trained model returns {len(s_out)} raw outputs and the model it "
                          f"imitates {len(t_out)}; a model must return the same outputs in training and eval mode")
    return _normalised_error(s_out, t_out)


def _normalised_error(s_out: list[torch.Tensor], t_out: list[torch.Tensor]) -> torch.Tensor:
    loss = torch.zeros(())
    for s, t in zip(s_out, t_out):
        loss = loss + nn.functional.mse_loss(s, t) / (t.pow(2).mean() + 1e-8)
    return loss


@torch.no_grad()
def output_error(model: nn.Module, reference: nn.Module, x: np.ndarray, batch: int = 128) -> float:
    """The normalised squared error of :func:`output_matching_loss` of ``model`` against ``reference``
    over ``x``, on their deployable outputs (what the ONNX holds, as :func:`onnx_output_errors`)."""
    from edgeslim.components.common.model_outputs import tensor_outputs

    total, n = 0.0, 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        total += float(_normalised_error(tensor_outputs(model(xb)), tensor_outputs(reference(xb)))) * len(xb)
        n += len(xb)
    return total / max(n, 1)


@torch.no_grad()
def onnx_output_errors(reference: nn.Module, onnx_paths: list[Path], x, batch: int = 128) -> list[float]:
    """:func:`output_matching_loss` of each ONNX model against ``reference`` over all of ``x``,
    accumulated batch by batch (the squared errors and the reference's power summed per output),
    so neither the inputs nor the outputs of the whole split are held at once."""
    from edgeslim.components.export import make_session
    from edgeslim.components.common.model_outputs import tensor_outputs
    from edgeslim.components.common.onnx_runtime import run_outputs

    sessions = [make_session(p, basic=True) for p in onnx_paths]
    err: list[list[float]] = [[] for _ in sessions]
    power: list[float] = []
    count: list[int] = []
    for i in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        want = tensor_outputs(reference(torch.from_numpy(xb)))
        if not power:
            power, count = [0.0] * len(want), [0] * len(want)
            err = [[0.0] * len(want) for _ in sessions]
        for k, t in enumerate(want):
            power[k] += float(t.double().pow(2).sum())
            count[k] += t.numel()
        for s, sess in enumerate(sessions):
            _, got = run_outputs(sess, xb, batch=len(xb))
            for k, (g, t) in enumerate(zip(got, want)):
                err[s][k] += float((torch.from_numpy(g).double() - t.double()).pow(2).sum())
    return [sum(e / c / (p / c + 1e-8) for e, p, c in zip(errs, power, count)) for errs in err]


def qat_detector(model: nn.Module, config, *, data: Splits, out_dir: str | Path, fp32_onnx: str | Path | None = None,
                 export_config=None, progress: Progress | None = None) -> StageResult:
    """Fine-tune a detector with int8 in the loop (:func:`edgeslim.components.quantize.qat.qat_chain`); export a weighted-placement Q/DQ ONNX.

    Args:
        model: the fp32 detector (not changed).
        config: a ``QATQuantizeConfig`` (calibrator, samples, float layers, epochs, lr, batch size, seed,
            augmentation); its placement is ``weighted`` whatever it says (the convs' inputs: module-level
            fake quantizers reproduce exactly that).
        data: train images for calibration and fine-tuning (labels are not used).
        out_dir: ``model.int8.onnx`` and the intermediate files.
        fp32_onnx: ``model`` already exported; exported here when None.
        export_config: ONNX export settings (default ``OnnxExportConfig()``).
        progress: called with (epoch, epochs, loss).

    Returns:
        StageResult whose model is the Q/DQ ONNX; metrics hold the output error against
        the fp32 model (validation images) of PTQ, of the fake-quant model before and after
        fine-tuning, and of the exported Q/DQ ONNX.
    """
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.quantize.qat import qat_chain
    from edgeslim.components.transform.train import TrainConfig, augmentation, fit

    t0 = time.perf_counter()
    if len(data.x_train) == 0:
        raise DataError("quantize(qat): the train split is empty; QAT fine-tunes on training images")
    fp32 = copy.deepcopy(model).eval()
    cfg = dataclasses.replace(config.ptq(), placement="weighted")
    x_val = data.x_val if len(data.x_val) else data.x_train[:256]
    ref = fold_batchnorm(fp32)
    for p in ref.parameters():
        p.requires_grad_(False)
    err: dict[str, float] = {}

    def twin(m: nn.Module, qdq_path: Path, _pre: Path) -> nn.Module:
        fq = fake_quant_detector(m, qdq_path)
        err["fake_quant_start"] = output_error(fq, ref, x_val)
        return fq

    def train(fq: nn.Module) -> None:
        with training_outputs(fq, ref):
            fit(fq, TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, schedule="cosine",
                                weight_decay=0.0, seed=config.seed, augment=augmentation(config.augment),
                                recalibrate_batchnorm=False),
                x=data.x_train, y=None, teacher=ref, loss_fn=output_matching_loss, progress=progress)
        err["fake_quant_tuned"] = output_error(fq.eval(), ref, x_val)

    run = qat_chain(fp32, cfg, data=data, out_dir=Path(out_dir), export_config=export_config or OnnxExportConfig(),
                    fp32_onnx=fp32_onnx, twin=twin, train=train, plain=without_fake_quant)
    err["ptq_onnx"], err["qat_onnx"] = onnx_output_errors(ref, [Path(run.ptq.model), run.qdq], x_val)
    metrics = {**run.final.metrics, "size_bytes": run.qdq.stat().st_size, "qat_epochs": config.epochs,
               "output_error_val": {k: float(f"{v:.4g}") for k, v in err.items()}}
    lineage = {"stage": "quantize", "method": "qat", "task": "detection", "placement": "weighted",
               "config": config.to_json_dict(),
               "loss": "output matching against the fp32 model (label-free)", "calibration_split": "train",
               "data_digest": data.digest()}
    return StageResult(run.qdq, metrics, lineage, time.perf_counter() - t0)
