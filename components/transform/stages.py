"""The torch-side compression stages (distill, prune), applied in recipe order.

The pipeline's transform task calls :func:`apply_torch_stages` through the Task.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import (
    ChannelPruneConfig,
    LogitDistillConfig,
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
            use :mod:`edgeslim.components.tasks.detection.train`'s).

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
