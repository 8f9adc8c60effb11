"""Distill and prune for segmenters: pixel-wise distillation, the classifier convs kept whole.

The loss of every label-trained stage is per pixel: cross-entropy against the label masks (pixels equal
to ``task.ignore_index`` left out) blended with the KL divergence between the teacher's and the
student's per-pixel class distributions at temperature T::

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over pixels, + (1 - alpha) * CE(s, y)

Channel pruning reuses :func:`edgeslim.components.transform.prune.prune` (Torch-Pruning's dependency
graph) on a view of the segmenter whose logits are flattened, with the classifier convs (every conv
whose output channels are the classes) left whole and without the classifier fine-tuning; the pruned
segmenter is then fine-tuned here with the pixel-wise loss, distilled from the unpruned model.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import ChannelPruneConfig, LogitDistillConfig
from edgeslim.components.transform.train import TrainConfig, fit


def classifier_layers(model: nn.Module, num_classes: int) -> list[str]:
    """Convs whose output channels are the classes: the per-pixel classifiers, pruned never."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]


def _logits(out: Any, task) -> torch.Tensor:
    from edgeslim.components.common.model_outputs import output_names, tensor_outputs

    outs = tensor_outputs(out)
    names = output_names(len(outs))
    return outs[names.index(task.output)] if task.output in names else outs[0]


def pixel_loss(task, *, temperature: float, alpha: float) -> Callable:
    """``(student outputs, teacher outputs or None, label masks) -> loss``: per-pixel cross-entropy
    (ignoring ``task.ignore_index``) blended with the per-pixel KL from the teacher (weight ``alpha``)."""

    def loss_fn(s_out, t_out, yb):
        s = _logits(s_out, task)
        y = yb.long()
        if y.shape[-2:] != s.shape[-2:]:
            s = nn.functional.interpolate(s, size=y.shape[-2:], mode="bilinear", align_corners=False)
        ce = nn.functional.cross_entropy(s, y, ignore_index=task.ignore_index)
        if t_out is None or not alpha:
            return ce
        t = _logits(t_out, task)
        if t.shape != s.shape:
            t = nn.functional.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        tt = temperature
        kl = nn.functional.kl_div(nn.functional.log_softmax(s / tt, 1), nn.functional.log_softmax(t / tt, 1),
                                  reduction="none", log_target=True).sum(1).mean()
        return alpha * tt * tt * kl + (1.0 - alpha) * ce

    return loss_fn


def _masks_tensor(y) -> torch.Tensor:
    """Label masks as one int32 tensor (a lazy split is read once, a batch at a time)."""
    out = np.empty(tuple(y.shape), np.int32)
    for i in range(0, len(y), 256):
        out[i:i + 256] = np.asarray(y[i:i + 256])
    return torch.from_numpy(out)


def train_segmenter(model: nn.Module, data: Splits, task, *, epochs: int, lr: float, batch_size: int,
                    teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.0,
                    seed: int = 0, augment: Sequence[str] = (), optimizer: str = "adamw",
                    weight_decay: float = 1e-4, schedule: str = "onecycle", recalibrate_batchnorm: bool = False,
                    progress: Callable[[int, int, float], None] | None = None) -> nn.Module:
    """Train ``model`` in place on the train split with :func:`pixel_loss`; returns it in eval mode."""
    if augment:
        raise ConfigError(f"distill.augment: {augment[0]} would move the images off their label masks; remove "
                          "distill.augment (a segmenter trains on its images as they are)")
    return fit(model, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                                  schedule=schedule, weight_decay=weight_decay, seed=seed,
                                  recalibrate_batchnorm=recalibrate_batchnorm),
               x=data.x_train, y=_masks_tensor(data.y_train),
               teacher=copy.deepcopy(teacher).eval() if teacher is not None and alpha else None,
               loss_fn=pixel_loss(task, temperature=temperature, alpha=alpha), progress=progress)


def prune_segmenter(model: nn.Module, config: ChannelPruneConfig, *, data: Splits, task,
                    progress: Callable[[int, int, float], None] | None = None) -> StageResult:
    """Structurally prune a segmenter to ``config.keep_fraction`` of its MACs; the classifier convs stay
    whole. Each of ``config.steps`` geometric steps is followed by ``finetune_epochs`` of pixel-wise
    training, distilled from the unpruned model when ``config.distill`` (``alpha``, ``temperature``)."""
    from edgeslim.components.transform.prune import FlatOutputs, count_macs_params, prune

    if config.importance == "taylor":
        raise ConfigError("prune.importance: 'taylor' needs a classification loss; for a segmenter use "
                          "l1, l2 or bn_scale")
    start = time.perf_counter()
    example = torch.from_numpy(np.ascontiguousarray(data.x_train[:1]))
    kept = classifier_layers(model, task.num_classes)
    zeros = {s: np.zeros(min(len(getattr(data, f"x_{s}")), n), np.int64) for s, n in
             (("train", 64), ("val", 16), ("test", 16))}
    view = Splits(x_train=data.x_train[:64], x_val=data.x_val[:16], x_test=data.x_test[:16], y_train=zeros["train"],
                  y_val=zeros["val"], y_test=zeros["test"], source=data.source)
    macs0, params0 = count_macs_params(model, example)
    pruned, now, losses, history = copy.deepcopy(model).eval(), macs0, [], []
    for step in range(1, config.steps + 1):
        goal = macs0 * config.keep_fraction ** (step / config.steps)
        structural = dataclasses.replace(config, keep_fraction=min(goal / now, 0.999), steps=1, finetune_epochs=0,
                                         distill=False, ignored_layers=[f"m.{n}" for n in
                                                                        [*kept, *config.ignored_layers]],
                                         layer_ratios={f"m.{k}": v for k, v in config.layer_ratios.items()}
                                         if step == 1 else {})
        pruned = prune(FlatOutputs(pruned), structural, data=view).model.m
        if config.finetune_epochs:
            done = len(losses)
            train_segmenter(pruned, data, task, epochs=config.finetune_epochs, lr=config.lr,
                            batch_size=config.batch_size, teacher=model if config.distill else None,
                            temperature=config.temperature, alpha=config.alpha if config.distill else 0.0,
                            seed=config.seed + step, recalibrate_batchnorm=True,
                            progress=lambda e, n, l, done=done: (losses.append(l),
                                                                 progress and progress(done + e, n * config.steps, l)))
        now, params1 = count_macs_params(pruned, example)
        history.append({"step": step, "macs": now, "goal": int(goal)})
    metrics = {"macs_before": macs0, "macs_after": now, "macs_ratio": macs0 / max(now, 1),
               "params_before": params0, "params_after": params1, "params_ratio": params0 / max(params1, 1),
               "heads_kept": kept, "finetune_loss": losses[-1] if losses else None, "steps": history}
    lineage = {"stage": "prune", "config": config.to_json_dict(), "task": "segmentation", "ignored_layers": kept,
               "distilled_from": "unpruned model" if config.distill else None, "data_digest": data.digest()}
    return StageResult(pruned.eval(), metrics, lineage, time.perf_counter() - start)


def distill_segmenter(model: nn.Module, config: LogitDistillConfig, *, data: Splits, teacher: nn.Module, task,
                      progress: Callable[[int, int, float], None] | None = None) -> StageResult:
    """Train a segmenter student with the pixel-wise loss, distilled from ``teacher``.

    ``student: previous`` trains a copy of ``model``; ``student: width`` prunes the teacher to ``width`` of
    its channels first (the classifier convs whole). BatchNorm statistics a short distillation leaves stale
    (MobileNetV3's momentum is 0.01) get the training inputs' average at the end."""
    start = time.perf_counter()
    if config.student == "uri":
        raise ConfigError("distill.student: 'uri' is not supported for segmenters; use previous or width")
    if getattr(config, "layer_pairs", None):
        raise ConfigError("distill(feature): a segmenter distils its per-pixel logits; use distill method logit")
    if config.student == "width":
        cfg = ChannelPruneConfig(keep_fraction=min(0.95, config.width ** 2), finetune_epochs=0)
        student = prune_segmenter(teacher, cfg, data=data, task=task).model
    else:
        student = copy.deepcopy(model)
    losses: list[float] = []
    train_segmenter(student, data, task, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                    teacher=teacher, temperature=config.temperature, alpha=config.alpha, seed=config.seed,
                    augment=config.augment, optimizer=config.optimizer, weight_decay=config.weight_decay,
                    schedule=config.schedule, recalibrate_batchnorm=True,
                    progress=lambda e, n, l: (losses.append(l), progress and progress(e, n, l)))
    kind = f"pixel-wise KL from the teacher (alpha {config.alpha:g}, T {config.temperature:g}) and cross-entropy"
    return distilled(student, config, data=data, losses=losses, kind=kind, start=start)


def distilled(student: nn.Module, config: LogitDistillConfig, *, data: Splits, losses: list[float], kind: str,
              start: float) -> StageResult:
    """A segmenter's distill stage result: the trained ``student`` in eval mode, its MACs and parameters, the last
    of its ``losses`` and what they were (``kind``), timed from ``start``."""
    from edgeslim.components.transform.prune import count_macs_params

    macs, params = count_macs_params(student, torch.from_numpy(np.ascontiguousarray(data.x_train[:1])))
    metrics = {"student_macs": macs, "student_params": params, "final_loss": losses[-1] if losses else None,
               "loss_kind": kind}
    lineage = {"stage": "distill", "config": config.to_json_dict(), "task": "segmentation",
               "data_digest": data.digest(), "loss": kind}
    return StageResult(student.eval(), metrics, lineage, time.perf_counter() - start)


def apply_segmenter_stages(model: nn.Module, stages: Sequence[Any], *, data: Splits, task,
                           progress: Callable[[str, int, int, float], None] | None = None,
                           distill: Callable[..., StageResult] | None = None,
                           prune: Callable[..., StageResult] | None = None) -> StageResult:
    """The recipe's distill/prune stages for a segmenter, in order
    (:func:`edgeslim.components.transform.stages.apply_torch_stages` with ``distill`` and ``prune``, by
    default the semantic segmenter's; a ``yolo-seg`` task passes :mod:`.train_instance`'s). The input model is
    the teacher and is not changed."""
    from edgeslim.components.transform.stages import apply_torch_stages

    distill, prune = distill or distill_segmenter, prune or prune_segmenter

    def distill_fn(current, cfg, cb):
        return distill(current, cfg, data=data, teacher=model, task=task, progress=cb)

    def prune_fn(current, cfg, cb):
        return prune(current, cfg, data=data, task=task, progress=cb)

    return apply_torch_stages(model, stages, data=data, teacher=model, progress=progress,
                              distill_fn=distill_fn, prune_fn=prune_fn)
