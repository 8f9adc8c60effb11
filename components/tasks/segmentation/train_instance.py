"""Train, distill and prune instance segmenters (``format: yolo-seg``): Ultralytics' own
``v8SegmentationLoss`` on the instance labels by default (``task.loss_fn`` otherwise), the prototype branch
and the mask-coefficient convs kept whole.

The loss of a label-trained stage is the label loss, blended with output distillation when a teacher is
given: ``(1 - alpha) * label loss + alpha * output matching``, the output matching being the squared error
of each raw head output (box distributions, class logits, mask coefficients, prototypes) over the teacher's
power. Channel pruning reuses :func:`edgeslim.components.transform.prune.prune` on a split-free copy of the
model (:mod:`edgeslim.components.transform.yolo`) whose outputs are flattened, with every layer of the
segmentation head (box, class and mask-coefficient convs, the DFL, the prototype branch) left whole; each
step is fine-tuned with the label loss, distilled from the unpruned model.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, EdgeslimError, SourceError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import ChannelPruneConfig, LogitDistillConfig
from edgeslim.components.transform.train import TrainConfig, fit
from edgeslim.components.transform.yolo import training_outputs

_RAW = ("boxes", "scores", "mask_coefficient", "proto")  # the segmentation head's raw training outputs


def _raw(out: Any) -> dict[str, torch.Tensor]:
    d = out[1] if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) else out
    if not isinstance(d, dict) or not all(k in d for k in _RAW):
        from edgeslim.components.common.model_outputs import describe

        raise SourceError(f"the segmenter returns {describe(out)} while it trains; a yolo-seg model returns its raw "
                          f"head values ({', '.join(_RAW)}) in training mode, as Ultralytics' SegmentationModel does")
    return d


def is_ultralytics_segmenter(model: nn.Module) -> bool:
    """An Ultralytics segmentation model, found without importing ``ultralytics``: its class comes from that
    package (or subclasses one of its classes, as a user's model built from a yaml may), it builds its own
    criterion, and its last layer has ``nc``, ``nm`` and ``proto``."""
    if not any(c.__module__.split(".")[0] == "ultralytics" for c in type(model).__mro__) \
            or not callable(getattr(model, "init_criterion", None)):
        return False
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    return head is not None and all(hasattr(head, a) for a in ("nc", "nm", "proto"))


class UltralyticsSegLoss:
    """Ultralytics' ``v8SegmentationLoss`` of a segmentation model (``model.init_criterion()`` with
    ``model.args``, ``overlap_mask`` off: one mask per instance). The instance labels become Ultralytics' batch
    (``batch_idx``, ``cls``, ``bboxes`` as normalised xywh, ``masks``); Ultralytics returns its losses times the
    batch size, this returns their sum per image."""

    def __init__(self, model: nn.Module):
        self.criterion = self._criterion(model)
        self.name = f"ultralytics {type(self.criterion).__name__}"

    @staticmethod
    def _criterion(model: nn.Module):
        from ultralytics.cfg import DEFAULT_CFG_DICT
        from ultralytics.utils import IterableSimpleNamespace

        args = getattr(model, "args", None)
        had = "args" in vars(model)
        base = vars(args) if args is not None and not isinstance(args, dict) and hasattr(args, "box") else \
            (args if isinstance(args, dict) else {})
        model.args = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **dict(base), "overlap_mask": False})
        try:
            return model.init_criterion()
        finally:
            if had:
                model.args = args
            else:
                del model.args

    def __call__(self, outputs: Any, targets: torch.Tensor, model: nn.Module) -> torch.Tensor:
        preds = _raw(outputs)
        first = preds["feats"][0]
        if torch.device(self.criterion.device) != first.device:  # trained on another device than it was built on
            self.criterion = self._criterion(model)
        h, w = targets.shape[-2:]
        idx, cls, boxes, masks = [], [], [], []
        for i, lab in enumerate(targets):
            m = lab > 0
            present = m.flatten(1).any(1)
            m, lab = m[present], lab[present]
            if not len(m):
                continue
            ys, xs = m.any(2), m.any(1)
            ar_y, ar_x = torch.arange(h, device=m.device), torch.arange(w, device=m.device)
            y1 = torch.where(ys, ar_y, h).min(1).values.float()
            y2 = torch.where(ys, ar_y, -1).max(1).values.float() + 1
            x1 = torch.where(xs, ar_x, w).min(1).values.float()
            x2 = torch.where(xs, ar_x, -1).max(1).values.float() + 1
            idx.append(torch.full((len(m),), float(i), device=m.device))
            cls.append(lab.flatten(1).max(1).values.float() - 1)
            boxes.append(torch.stack([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], 1))
            masks.append(m.float())
        dev = first.device
        batch = {"batch_idx": torch.cat(idx).to(dev) if idx else torch.zeros(0, device=dev),
                 "cls": (torch.cat(cls) if cls else torch.zeros(0)).to(dev).view(-1, 1),
                 "bboxes": (torch.cat(boxes) if boxes else torch.zeros(0, 4)).to(dev),
                 "masks": (torch.cat(masks) if masks else torch.zeros(0, h, w)).to(dev)}
        loss, _ = self.criterion(preds, batch)
        return loss.sum() / max(len(targets), 1)


def label_loss(model: nn.Module, task) -> tuple[Callable, str]:
    """The loss ``model`` trains with on its instance labels: the recipe's ``task.loss_fn``, else Ultralytics'
    own for an Ultralytics segmentation model.

    Raises:
        ConfigError: ``task.loss_fn`` cannot be imported, or neither applies (one line naming the way out).
    """
    spec = getattr(task, "loss_fn", "")
    if spec:
        import importlib

        mod, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except Exception as exc:  # any import-time failure of user code is the same problem to a user
            raise ConfigError(f"task.loss_fn {spec!r}: cannot import it ({type(exc).__name__}: {str(exc)[:120]}); "
                              "install it or put it on PYTHONPATH") from None

        def call(outputs, targets, m):
            try:
                return fn(outputs, targets, m)
            except EdgeslimError:
                raise
            except Exception as exc:  # user code: say whose it is
                raise SourceError(f"task.loss_fn {spec!r} raised {type(exc).__name__}: {str(exc)[:160]}") from None

        return call, f"task.loss_fn {spec}"
    if is_ultralytics_segmenter(model):
        loss = UltralyticsSegLoss(model)
        return loss, loss.name
    raise ConfigError(f"training a yolo-seg segmenter needs a label loss: {type(model).__name__} is no Ultralytics "
                      "segmentation model; set task.loss_fn: module:function (loss_fn(outputs, targets, model))")


def output_matching(student: Any, teacher: Any) -> torch.Tensor:
    """Squared error of each raw head output over the teacher's power, summed."""
    s, t = _raw(student), _raw(teacher)
    loss = torch.zeros((), device=s["proto"].device)
    for k in _RAW:
        loss = loss + ((s[k] - t[k]) ** 2).mean() / (t[k] ** 2).mean().clamp(min=1e-8)
    return loss


def _padded(y) -> torch.Tensor:
    """Per-image ``(k, H, W)`` instance labels as one ``(N, K, H, W)`` uint8 tensor (empty instances padded)."""
    labels = [np.asarray(v, np.uint8) for v in y]
    h, w = labels[0].shape[-2:] if labels else (0, 0)
    out = np.zeros((len(labels), max([len(v) for v in labels] + [1]), h, w), np.uint8)
    for i, v in enumerate(labels):
        out[i, :len(v)] = v
    return torch.from_numpy(out)


def train_instance_segmenter(model: nn.Module, x, y, task, *, epochs: int, lr: float, batch_size: int,
                             seed: int = 0, teacher: nn.Module | None = None, alpha: float = 0.0,
                             recalibrate_batchnorm: bool = False,
                             progress: Callable[[int, int, float], None] | None = None) -> str:
    """Train ``model`` in place (AdamW, one-cycle) on instance labels ``y``; returns the loss in words."""
    own, name = label_loss(model, task)
    t_model = copy.deepcopy(teacher).eval() if teacher is not None and alpha else None

    def loss_fn(out, t_out, yb):
        loss = own(out, yb, model)
        if t_out is not None:
            loss = (1.0 - alpha) * loss + alpha * output_matching(out, t_out)
        return loss

    with training_outputs(*[m for m in (model, t_model) if m is not None]):
        fit(model, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adamw", schedule="onecycle",
                               weight_decay=5e-4, warmup=0.15, seed=seed, recalibrate_batchnorm=recalibrate_batchnorm),
            x=np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, y=_padded(y), teacher=t_model,
            loss_fn=loss_fn, progress=progress)
    return f"{name} (labels)" + (f" with output distillation (alpha {alpha:g})" if t_model is not None else "")


def head_layers(model: nn.Module) -> list[str]:
    """Every layer of the segmentation head: box, class and mask-coefficient convs, the DFL, the prototypes."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential):
        raise ConfigError(f"{type(model).__name__}: no .model layer list to find the segmentation head in; prune "
                          "supports Ultralytics segmentation models")
    last = f"model.{len(layers) - 1}"
    return [n for n, m in model.named_modules() if n.startswith(last + ".") and isinstance(m, (nn.Conv2d, nn.Linear))]


def prune_instance_segmenter(model: nn.Module, config: ChannelPruneConfig, *, data: Splits, task,
                             progress: Callable[[int, int, float], None] | None = None) -> StageResult:
    """Prune to ``config.keep_fraction`` of the MACs in ``config.steps`` geometric steps, the head whole,
    each step fine-tuned with the label loss (distilled from the unpruned model when ``config.distill``)."""
    from edgeslim.components.transform.c2f import without_splits
    from edgeslim.components.transform.prune import FlatOutputs, count_macs_params, prune
    from edgeslim.components.transform.yolo import split_free

    if config.importance == "taylor":
        raise ConfigError("prune.importance: 'taylor' needs a classification loss; for a segmenter use l1, l2 "
                          "or bn_scale")
    start = time.perf_counter()
    example = torch.from_numpy(np.ascontiguousarray(data.x_train[:1]))
    pruned, split_blocks = split_free(without_splits(model))
    kept = head_layers(pruned)
    zeros = {s: np.zeros(min(len(getattr(data, f"x_{s}")), n), np.int64) for s, n in
             (("train", 64), ("val", 16), ("test", 16))}
    view = Splits(x_train=data.x_train[:64], x_val=data.x_val[:16], x_test=data.x_test[:16], y_train=zeros["train"],
                  y_val=zeros["val"], y_test=zeros["test"], source=data.source)
    macs0, params0 = count_macs_params(model, example)
    now, losses, history, kind = macs0, [], [], None
    for step in range(1, config.steps + 1):
        goal = macs0 * config.keep_fraction ** (step / config.steps)
        structural = dataclasses.replace(config, keep_fraction=min(goal / now, 0.999), steps=1, finetune_epochs=0,
                                         distill=False, ignored_layers=[f"m.{n}" for n in
                                                                        [*kept, *config.ignored_layers]],
                                         layer_ratios={})
        pruned = prune(FlatOutputs(pruned), structural, data=view).model.m
        if config.finetune_epochs:
            done = len(losses)
            kind = train_instance_segmenter(
                pruned, data.x_train, data.y_train, task, epochs=config.finetune_epochs, lr=config.lr,
                batch_size=config.batch_size, seed=config.seed + step, teacher=model if config.distill else None,
                alpha=config.alpha if config.distill else 0.0, recalibrate_batchnorm=True,
                progress=lambda e, n, l, done=done: (losses.append(l),
                                                     progress and progress(done + e, n * config.steps, l)))
        now, params1 = count_macs_params(pruned, example)
        history.append({"step": step, "macs": now, "goal": int(goal)})
    metrics = {"macs_before": macs0, "macs_after": now, "macs_ratio": macs0 / max(now, 1), "params_before": params0,
               "params_after": params1, "params_ratio": params0 / max(params1, 1), "heads_kept": kept,
               "finetune_loss": losses[-1] if losses else None, "finetune_loss_kind": kind, "steps": history}
    lineage = {"stage": "prune", "config": config.to_json_dict(), "task": "segmentation", "ignored_layers": kept,
               "split_free_blocks": split_blocks, "data_digest": data.digest(), "finetune_loss": kind}
    return StageResult(pruned.eval(), metrics, lineage, time.perf_counter() - start)


def distill_instance_segmenter(model: nn.Module, config: LogitDistillConfig, *, data: Splits, teacher: nn.Module,
                               task, progress: Callable[[int, int, float], None] | None = None) -> StageResult:
    """Train a student (``previous``: a copy; ``width``: the teacher pruned to ``width``, head whole) with the
    label loss and output distillation from ``teacher`` (``alpha``)."""
    from edgeslim.components.tasks.segmentation.train import distilled

    start = time.perf_counter()
    if config.student == "uri" or getattr(config, "layer_pairs", None) or config.augment:
        raise ConfigError("distill: a yolo-seg segmenter distils with student previous or width, method logit, "
                          "and no augment (it would move the images off their masks)")
    if config.student == "width":
        student = prune_instance_segmenter(teacher, ChannelPruneConfig(keep_fraction=min(0.95, config.width ** 2),
                                                                       finetune_epochs=0), data=data, task=task).model
    else:
        student = copy.deepcopy(model)
    losses: list[float] = []
    kind = train_instance_segmenter(student, data.x_train, data.y_train, task, epochs=config.epochs, lr=config.lr,
                                    batch_size=config.batch_size, seed=config.seed, teacher=teacher, alpha=config.alpha,
                                    progress=lambda e, n, l: (losses.append(l), progress and progress(e, n, l)))
    return distilled(student, config, data=data, losses=losses, kind=kind, start=start)
