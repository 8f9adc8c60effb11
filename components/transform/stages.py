"""The torch-side compression stages applied in recipe order, and the non-PTQ quantizers.

The pipeline's transform task calls :func:`apply_torch_stages`; its quantize
task calls :func:`quantize_with` for the ``qat`` and ``auto`` methods.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import (
    AccuracyAwareQuantizeConfig,
    ChannelPruneConfig,
    LogitDistillConfig,
    QATQuantizeConfig,
)

# progress(stage label, step, steps, loss)
Progress = Callable[[str, int, int, float], None]


def apply_torch_stages(model, stages: Sequence[Any], *, data: Splits, teacher,
                       progress: Progress | None = None, distill_fn: Callable | None = None,
                       prune_fn: Callable | None = None) -> StageResult:
    """Apply distill/prune stages in the order given; the output of one is the input of the next.

    Args:
        model: the starting torch model (usually the registered teacher); not changed.
        stages: ``LogitDistillConfig``/``FeatureDistillConfig``/``ChannelPruneConfig`` items.
        data: the splits (training from train, metrics from val/test).
        teacher: the fp32 model distillation imitates.
        progress: called with (stage label, step, steps, loss).
        distill_fn, prune_fn: ``(current model, stage config, progress) -> StageResult`` in
            place of :func:`.distill.distill` / :func:`.prune.prune` (a detector's stages
            use :mod:`.detect_compress`'s).

    Returns:
        StageResult with the last model; ``metrics["stages"]`` holds each stage's metrics
        and ``lineage["stages"]`` each stage's lineage.
    """
    from edgeslim.components.transform.distill import distill
    from edgeslim.components.transform.prune import count_macs_params, prune

    start = time.perf_counter()
    import torch

    example = torch.from_numpy(data.x_train[:1])
    macs0, params0 = count_macs_params(model, example)
    current = model
    done: list[dict[str, Any]] = []
    lineage: list[dict[str, Any]] = []
    for i, cfg in enumerate(stages):
        label = f"{i + 1}:{cfg.stage}({cfg.method})"

        def cb(step: int, steps: int, loss: float, label: str = label) -> None:
            if progress:
                progress(label, step, steps, loss)

        if isinstance(cfg, LogitDistillConfig):
            res = (distill_fn(current, cfg, cb) if distill_fn else
                   distill(current, cfg, data=data, teacher=teacher, progress=cb))
        elif isinstance(cfg, ChannelPruneConfig):
            res = prune_fn(current, cfg, cb) if prune_fn else prune(current, cfg, data=data, progress=cb)
        else:
            raise ConfigError(
                f"stages[{i}]: {cfg.stage}({cfg.method}) is not a torch stage; only distill and "
                "prune run before export"
            )
        current = res.model
        done.append({"stage": cfg.stage, "method": cfg.method, "seconds": round(res.seconds, 2),
                     **{k: v for k, v in res.metrics.items() if k not in ("channels", "steps", "heads_kept")}})
        lineage.append(res.lineage)
    macs1, params1 = count_macs_params(current, example)
    metrics = {"stages": done, "macs_before": macs0, "macs_after": macs1,
               "macs_ratio": macs0 / max(macs1, 1), "params_before": params0,
               "params_after": params1, "params_ratio": params0 / max(params1, 1)}
    return StageResult(current, metrics, {"stages": lineage}, time.perf_counter() - start)


def quantize_with(config, *, model, fp32_onnx: str | Path, parent_onnx: str | Path, recipe,
                  data: Splits, out_dir: str | Path, tracking_uri: str | None = None,
                  parent_run_id: str | None = None) -> StageResult:
    """Quantize with the ``qat`` or ``auto`` method (``ptq`` is :func:`.quantize.quantize`).

    Args:
        config: a ``QATQuantizeConfig`` or ``AccuracyAwareQuantizeConfig``.
        model: the fp32 torch model ``fp32_onnx`` was exported from.
        fp32_onnx: its ONNX export.
        parent_onnx: the registered parent's fp32 ONNX (the gate's reference).
        recipe: the whole recipe (export settings, gate).
        data: the splits.
        out_dir: where the Q/DQ ONNX and per-trial files go.
        tracking_uri: MLflow server for the auto method's child runs.
        parent_run_id: the run the auto method's trials become children of.
    """
    if isinstance(config, QATQuantizeConfig):
        from edgeslim.components.quantize.qat import qat

        return qat(model, config, data=data, out_dir=out_dir, fp32_onnx=fp32_onnx,
                   export_config=recipe.export)
    if isinstance(config, AccuracyAwareQuantizeConfig):
        from edgeslim.components.quantize.search import quantize_auto

        return quantize_auto(model, fp32_onnx, config, data=data, parent_onnx_path=parent_onnx,
                             gate=recipe.gate, out_dir=out_dir, tracking_uri=tracking_uri,
                             parent_run_id=parent_run_id, export_config=recipe.export)
    raise ConfigError(
        f"quantize: method {getattr(config, 'method', '?')!r} is not handled here; use ptq, qat or auto"
    )
