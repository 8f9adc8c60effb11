"""Distill and prune for detectors: heads kept whole, fine-tuned with the detection loss.

Channel pruning reuses :func:`edgeslim.components.transform.prune.prune` (Torch-Pruning's dependency graph:
correct through C2f splits, residual adds and concats) on a view of the
detector whose outputs are flattened into one tensor, with every head's
prediction conv (and any ``ignored_layers``) left alone and without the
classifier fine-tuning; the pruned detector is then fine-tuned here with the
detection loss, distilled from the unpruned model at the neck outputs and at the
head outputs (``prune.alpha``: its class scores and confident boxes), in
``prune.steps`` geometric steps with fine-tuning after each. A detector whose outputs are no
``(box, cls)`` map pairs (Ultralytics' one decoded output) is made split-free first
(:mod:`edgeslim.components.transform.yolo`), keeps the layers before its outputs and a fixed decode conv whole, and is
fine-tuned on its labels when a label loss exists for it (the recipe's ``task.loss_fn``, or Ultralytics'
own criterion for an Ultralytics model: :func:`label_loss`), else label-free to reproduce the unpruned
model's raw outputs (:func:`finetune_outputs`).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import ChannelPruneConfig, FeatureDistillConfig, LogitDistillConfig
from edgeslim.components.transform.c2f import without_splits
from edgeslim.components.transform.train import TrainConfig, fit
from edgeslim.components.transform.yolo import attention_layers, last_layers, split_free, training_outputs

# What a detector's pruning fine-tunes with: the detection loss on the labels for (box, cls) map pairs,
# else (any other outputs, e.g. Ultralytics' decoded one) the unpruned model's raw outputs, label-free.
FINETUNE_LOSS = {True: "detection loss (labels) with distillation from the unpruned model",
                 False: "output matching against the unpruned model's raw outputs (label-free)"}


def head_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Conv layers whose output is a model output, directly or through a sigmoid/softmax."""
    from edgeslim.components.transform.prune import layer_outputs

    seen, outs = layer_outputs(model, example)
    outs = [o for o in outs if isinstance(o, torch.Tensor)]  # auxiliaries beside the outputs are no head
    heads = []
    for name, t in seen.items():
        for o in outs:
            if o.shape != t.shape:
                continue
            if any(torch.allclose(f(t), o, atol=1e-6) for f in (lambda v: v, torch.sigmoid)):
                heads.append(name)
                break
    return heads


def _detector_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _match(model: nn.Module, patterns: Sequence[str], key: str) -> list[str]:
    names = _detector_names(model)
    out: list[str] = []
    for pat in patterns:
        hit = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise ConfigError(f"prune.{key}: no layer of the detector matches {pat!r}; layers look like "
                              f"{', '.join(names[:8])}")
        out += hit
    return out


def prune_detector(model: nn.Module, config: ChannelPruneConfig, *, data: Splits,
                   teacher: nn.Module | None = None, feature_layers: Sequence[str] = (),
                   progress: Callable[[int, int, float], None] | None = None, task=None) -> StageResult:
    """Structurally prune a detector to ``config.keep_fraction`` of its MACs; heads stay whole.

    Args:
        model: the detector (not changed).
        config: pruning settings. The target is reached in ``steps`` geometric steps, each followed
            by ``finetune_epochs`` of detection-loss fine-tuning; with a teacher the loss is
            ``(1 - alpha) * detection + alpha * head-output distillation`` plus the feature MSE. A model
            without map pairs is fine-tuned on output matching against the teacher (default: itself).
        data: detection splits (``y_*`` hold boxes).
        teacher: distilled from at ``feature_layers`` and at its outputs while fine-tuning (default:
            the unpruned model when ``config.distill``).
        feature_layers: module names present in both (e.g. the neck outputs).
        task: the recipe's ``DetectionTaskConfig``; fine-tuning takes the levels' strides from its decoder.

    Raises:
        ConfigError: ``importance: taylor`` (it needs a classification loss) or a pattern matches nothing.
    """
    from edgeslim.components.transform.prune import FlatOutputs, count_macs_params, prune

    if config.importance == "taylor":
        raise ConfigError("prune.importance: 'taylor' needs a classification loss; for a detector use "
                          "l1, l2 or bn_scale")
    start = time.perf_counter()
    example = torch.from_numpy(data.x_train[:1])
    pruned, split_blocks = split_free(without_splits(model))
    pairs = returns_map_pairs(model, example)
    labels = label_loss(model, example, task) if config.finetune_epochs else (None, "")
    label_trained = pairs or labels[0] is not None
    heads = head_layers(model, example)
    if not pairs:  # e.g. one decoded output: the layers before it, and a fixed decode conv (DFL)
        heads = sorted(set(heads) | set(last_layers(pruned, example)))
    ignored = sorted(set(heads) | set(attention_layers(pruned))
                     | set(_match(model, config.ignored_layers, "ignored_layers")))
    # Placeholder class labels: the classifier pruner reports top-1 we do not use; no training there.
    zeros = {f"y_{s}": np.zeros(len(getattr(data, f"x_{s}")), np.int64) for s in ("train", "val", "test")}
    view = Splits(x_train=data.x_train[:256], x_val=data.x_val[:64], x_test=data.x_test[:64],
                  y_train=zeros["y_train"][:256], y_val=zeros["y_val"][:64], y_test=zeros["y_test"][:64],
                  source=data.source)

    macs0, params0 = count_macs_params(model, example)
    now = macs0  # the split-free copy has the same MACs; each step's count is the next one's start
    kd = teacher if teacher is not None else (model if config.distill else None)
    losses: list[float] = []
    history = []
    for step in range(1, config.steps + 1):
        # Geometric steps, as the classifier pruner: step k keeps keep_fraction ** (k / steps).
        goal = macs0 * config.keep_fraction ** (step / config.steps)
        structural = dataclasses.replace(config, keep_fraction=min(goal / now, 0.999), steps=1,
                                         finetune_epochs=0, distill=False,
                                         ignored_layers=[f"m.{n}" for n in ignored],
                                         layer_ratios={f"m.{k}": v for k, v in config.layer_ratios.items()}
                                         if step == 1 else {})
        pruned = prune(FlatOutputs(pruned), structural, data=view).model.m
        fidelity = {}
        if not pairs:  # no map-pair loss to judge by: how close the outputs stay to the unpruned model's
            fidelity["sqnr_db_val_pruned"] = round(output_sqnr_db(pruned, model, data.x_val[:64]), 3)
        if config.finetune_epochs and not label_trained:
            done = len(losses)
            finetune_outputs(pruned, kd if kd is not None else model, data.x_train, epochs=config.finetune_epochs,
                             lr=config.lr, batch_size=config.batch_size, seed=config.seed + step - 1,
                             recalibrate_batchnorm=True,
                             progress=lambda e, n, l, done=done: (
                                 losses.append(l), progress and progress(done + e, n * config.steps, l)))
        elif config.finetune_epochs:
            n_ep = config.finetune_epochs
            done = len(losses)
            train_detector(pruned, data.x_train, data.y_train, epochs=n_ep, lr=config.lr,
                           batch_size=config.batch_size, seed=config.seed + step - 1, teacher=kd,
                           feature_layers=feature_layers if kd is not None else (),
                           output_alpha=config.alpha if kd is not None else 0.0, task=task, own_loss=labels,
                           recalibrate_batchnorm=True,
                           progress=lambda e, n, l, done=done: (
                               losses.append(l),
                               progress and progress(done + e, n * config.steps, l)))
        if fidelity and config.finetune_epochs:
            fidelity["sqnr_db_val_finetuned"] = round(output_sqnr_db(pruned, model, data.x_val[:64]), 3)
        now, params1 = count_macs_params(pruned, example)
        history.append({"step": step, "macs": now, "goal": int(goal), **fidelity})
    macs1 = now
    kind = FINETUNE_LOSS[pairs] if labels[0] is None else \
        loss_kind(labels[1], alpha=config.alpha if kd is not None else 0.0,
                  features=feature_layers if kd is not None else (), teacher="unpruned model")
    kind = kind if config.finetune_epochs else None
    metrics = {"macs_before": macs0, "macs_after": macs1, "macs_ratio": macs0 / max(macs1, 1),
               "params_before": params0, "params_after": params1, "params_ratio": params0 / max(params1, 1),
               "heads_kept": heads, "finetune_loss": losses[-1] if losses else None, "steps": history,
               "finetune_loss_kind": kind,
               **({"output_sqnr_db_val": history[-1].get("sqnr_db_val_finetuned", history[-1]["sqnr_db_val_pruned"])}
                  if not pairs else {})}
    lineage = {"stage": "prune", "config": config.to_json_dict(), "task": "detection",
               "ignored_layers": ignored, "distilled_at": list(feature_layers) if label_trained else [],
               "split_free_blocks": split_blocks, "data_digest": data.digest(),
               "finetune_loss": kind}
    return StageResult(pruned.eval(), metrics, lineage, time.perf_counter() - start)


def distill_detector(model: nn.Module, config: LogitDistillConfig, *, data: Splits, teacher: nn.Module,
                     progress: Callable[[int, int, float], None] | None = None, task=None) -> StageResult:
    """Train a detector student with its label loss plus feature distillation from ``teacher``.

    ``student: previous`` trains a copy of ``model``; ``student: width`` prunes the teacher to
    ``width`` of its channels first (heads whole). Feature pairs come from ``layer_pairs``
    (method ``feature``; both names must exist in both models) or, for method ``logit``,
    the neck outputs named in ``NECK_OUTPUTS`` when the model has them. The label loss is
    :func:`label_loss`'s; a student without ``(box, cls)`` map pairs (e.g. Ultralytics') also matches
    the teacher's raw outputs, weighted by ``distill.alpha``
    (``(1 - alpha) * label loss + alpha * output matching``).
    """
    from edgeslim.components.transform.prune import count_macs_params

    start = time.perf_counter()
    if config.student == "uri":
        raise ConfigError("distill.student: 'uri' is not supported for detectors yet; use previous or width")
    if config.student == "width":
        cfg = ChannelPruneConfig(keep_fraction=min(0.95, config.width ** 2), finetune_epochs=0)
        student = prune_detector(teacher, cfg, data=data).model
    else:
        student = copy.deepcopy(model)
    if isinstance(config, FeatureDistillConfig):
        bad = [p for p in config.layer_pairs if p[0] != p[1]]
        if bad:
            raise ConfigError(f"distill(feature).layer_pairs: {bad[0]} pairs different layer names; for a "
                              "detector pair the same neck layer in teacher and student, e.g. [fpn4, fpn4]")
        layers = [p[0] for p in config.layer_pairs]
    else:
        names = set(_detector_names(student))
        layers = [n for n in NECK_OUTPUTS if n in names]
    example = torch.from_numpy(data.x_train[:1])
    labels = label_loss(student, example, task)
    alpha = config.alpha if not returns_map_pairs(student, example) else 0.0
    losses: list[float] = []
    train_detector(student, data.x_train, data.y_train, epochs=config.epochs, lr=config.lr,
                   batch_size=config.batch_size, seed=config.seed, teacher=teacher, feature_layers=layers,
                   feature_weight=getattr(config, "feature_weight", 1.0), task=task, own_loss=labels,
                   output_alpha=alpha, progress=lambda e, n, l: (losses.append(l), progress and progress(e, n, l)))
    macs, params = count_macs_params(student, example)
    kind = loss_kind(labels[1], alpha=alpha, features=layers, teacher="teacher")
    metrics = {"student_macs": macs, "student_params": params, "feature_layers": layers,
               "final_loss": losses[-1] if losses else None, "loss_kind": kind}
    lineage = {"stage": "distill", "config": config.to_json_dict(), "task": "detection",
               "data_digest": data.digest(), "loss": kind}
    return StageResult(student.eval(), metrics, lineage, time.perf_counter() - start)


def apply_detector_stages(model: nn.Module, stages: Sequence[Any], *, data: Splits, task=None,
                          progress: Callable[[str, int, int, float], None] | None = None) -> StageResult:
    """The recipe's distill/prune stages for a detector, in order: :func:`edgeslim.components.transform.stages.apply_torch_stages`
    with the detector's distill and prune. The input model is the teacher and is not changed."""
    from edgeslim.components.transform.stages import apply_torch_stages

    for cfg in stages:
        if getattr(cfg, "augment", None):
            raise ConfigError(f"{cfg.stage}.augment: a detector's {cfg.stage} trains on its box labels, which "
                              f"{cfg.augment} would move off their objects; remove {cfg.stage}.augment "
                              "(QAT, which matches the fp32 outputs instead of labels, takes it)")
    neck = [n for n in NECK_OUTPUTS if n in set(_detector_names(model))]

    def distill_fn(current, cfg, cb):
        return distill_detector(current, cfg, data=data, teacher=model, progress=cb, task=task)

    def prune_fn(current, cfg, cb):
        return prune_detector(current, cfg, data=data, teacher=current if cfg.distill else None,
                              feature_layers=neck if cfg.distill else (), progress=cb, task=task)

    return apply_torch_stages(model, stages, data=data, teacher=model, progress=progress,
                              distill_fn=distill_fn, prune_fn=prune_fn)


# Module names a feature-distillation pair uses when a detector has them: the reference detector's
# neck outputs, one per stride.
NECK_OUTPUTS = ("fpn4", "pan8", "pan16")


def label_loss(model: nn.Module, example: torch.Tensor, task=None) -> tuple[Callable | None, str]:
    """The loss ``model`` trains with on its box labels, and its name for the stage's metrics and lineage.

    The recipe's ``task.loss_fn`` when set (any output format); else, for an Ultralytics detection model,
    Ultralytics' own criterion (:class:`.label_loss.UltralyticsLoss`); else edgeslim's detection loss
    for ``(box, cls)`` map pairs (the function is None: :func:`train_detector` builds its dense targets);
    else ``(None, "")``: no label loss, so pruning fine-tunes label-free.

    Raises:
        ConfigError: ``task.loss_fn`` cannot be imported or is no function (one line naming it and the fix).
    """
    from edgeslim.components.tasks.detection.label_loss import UltralyticsLoss, is_ultralytics_detector, user_loss

    spec = getattr(task, "loss_fn", "")
    if spec:
        return user_loss(spec), f"task.loss_fn {spec}"
    if is_ultralytics_detector(model):
        try:
            ultra = UltralyticsLoss(model)
        except (ConfigError, NotImplementedError):  # its criterion wants more than boxes (masks, keypoints)
            ultra = None
        if ultra is not None:
            return ultra, ultra.name
    return None, "detection loss" if returns_map_pairs(model, example) else ""


def loss_kind(name: str, *, alpha: float = 0.0, features: Sequence[str] = (), teacher: str = "teacher") -> str:
    """What a label-trained stage trained with, in words: ``"<loss> (labels)"`` and its distillation terms."""
    terms = [f"output distillation from the {teacher} (alpha {alpha:g})"] if alpha else []
    terms += [f"feature distillation at {', '.join(features)}"] if features else []
    return f"{name} (labels)" + (" with " + " and ".join(terms) if terms else "")


def train_detector(model: nn.Module, x: np.ndarray, labels: Sequence[np.ndarray], *, epochs: int = 20,
                   lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
                   teacher: nn.Module | None = None, feature_layers: Sequence[str] = (),
                   feature_weight: float = 1.0, output_alpha: float = 0.0,
                   progress: Callable[[int, int, float], None] | None = None, task=None,
                   own_loss: tuple[Callable | None, str] | None = None,
                   recalibrate_batchnorm: bool = False) -> nn.Module:
    """Train ``model`` in place (AdamW, one-cycle); repeatable for a seed; returns it in eval mode.
    Pruning asks for ``recalibrate_batchnorm`` (:func:`edgeslim.components.transform.train.fit`'s: stale BatchNorm statistics after a
    short fine-tune that follows a change of architecture get the training inputs' average).

    Args:
        model: a detector: one returning ``(box, cls)`` pairs per level like :class:`DigitsDetector`
            (edgeslim's detection loss), or any detector with a label loss (:func:`label_loss`: the
            recipe's ``task.loss_fn``, Ultralytics' own loss).
        x: canvases (N, C, H, W): a numpy array or a lazy split (read a batch at a time).
        labels: per canvas a (k, 5) array ``[x1, y1, x2, y2, class]``.
        teacher: distil from it: feature MSE at ``feature_layers`` (module names present in
            both models, e.g. the neck outputs), through learned 1x1 adapters.
        output_alpha: with a teacher, also distil its outputs (map pairs: :func:`output_distill_loss`, its
            class scores as soft targets on every cell, its boxes where it is confident; other outputs: the
            detector QAT's output matching on the raw head values); the loss is
            ``(1 - output_alpha) * label loss + output_alpha * output distillation`` (+ features).
        progress: called with (epoch, epochs, mean loss per sample of the epoch).
        task: the recipe's ``DetectionTaskConfig``: its ``loss_fn``; the levels' strides come from its
            decoder, else from ``model.stride``, else from the input size over each map's size (:func:`.loss.level_strides`).
        own_loss: :func:`label_loss`'s answer when the caller has it already.

    Raises:
        ConfigError: the model has no label loss: no ``(box, cls)`` map pairs, no ``task.loss_fn``, and
            not an Ultralytics model.
    """
    from edgeslim.components.common.model_outputs import describe
    from edgeslim.components.tasks.detection.qat import output_matching_loss
    from edgeslim.components.tasks.detection.loss import (build_targets, detection_loss, level_strides,
                                                          output_distill_loss)
    from edgeslim.components.tasks.detection.label_loss import pad_boxes, unpad_boxes

    example = torch.from_numpy(x[:1])
    with torch.no_grad():
        raw = model(example)
    outs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    pairs = returns_map_pairs(model, example, raw)
    own, _ = own_loss if own_loss is not None else label_loss(model, example, task)
    if own is None and not pairs:
        raise ConfigError(
            f"fine-tuning a detector trains (box, cls) map pairs per level with edgeslim's detection loss; "
            f"this model returns {describe(raw)}; set task.loss_fn: module:function to your detector's loss "
            "(docs/model-code.md, \"The training loss\"), leave distill out of its recipe (prune fine-tunes such a "
            "model label-free, export and quantize need no loss), or fine-tune it with its own trainer before "
            "registering it")
    if own is None:
        strides = level_strides(model, example, outs, task)
        targets = [{k: torch.from_numpy(v) for k, v in t.items()}
                   for t in build_targets(labels, tuple(x.shape[-2:]), outs[1].shape[1], strides)]

        def labelled(out, yb):
            return detection_loss(out, yb)
    else:
        targets = pad_boxes(labels)

        def labelled(out, yb):
            return own(out, unpad_boxes(yb), model)
    distilled = output_distill_loss if pairs else (lambda s, t: output_matching_loss(s, t, None))
    use_teacher = teacher is not None and bool(feature_layers or output_alpha)
    t_model = copy.deepcopy(teacher) if use_teacher else None

    def loss_fn(out, t_out, yb):
        loss = labelled(out, yb)
        if t_out is not None and output_alpha:
            loss = (1.0 - output_alpha) * loss + output_alpha * distilled(out, t_out)
        return loss

    # A head with an export flag (Ultralytics' Detect) returns its raw values beside the decoded ones in eval
    # mode too while it trains, so the teacher's raw outputs can be matched.
    with training_outputs(*[m for m in (model, t_model) if m is not None]):
        return fit(model, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adamw",
                                      schedule="onecycle", weight_decay=5e-4, warmup=0.15, seed=seed,
                                      feature_pairs=[[n, n] for n in feature_layers] or None,
                                      feature_weight=feature_weight, recalibrate_batchnorm=recalibrate_batchnorm),
                   x=np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, y=targets, teacher=t_model,
                   loss_fn=loss_fn, progress=progress)


def returns_map_pairs(model: nn.Module, example: torch.Tensor, raw: Any = None) -> bool:
    """Whether ``model`` returns ``(box, cls)`` map pairs per level (what the detection loss trains)."""
    if raw is None:
        with torch.no_grad():
            raw = model.eval()(example)
    outs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    return bool(outs) and not len(outs) % 2 and all(isinstance(o, torch.Tensor) and o.dim() == 4 for o in outs) \
        and all(b.shape[1] == 4 for b in outs[0::2])


def finetune_outputs(model: nn.Module, reference: nn.Module, x, *, epochs: int, lr: float, batch_size: int,
                     seed: int = 0, progress: Callable[[int, int, float], None] | None = None,
                     recalibrate_batchnorm: bool = False) -> nn.Module:
    """Fine-tune ``model`` in place to reproduce ``reference``'s raw outputs on ``x``, label-free
    (``recalibrate_batchnorm`` as :func:`train_detector`'s).

    The loss is the detector QAT's (:func:`.qat.output_matching_loss`: per raw output, the
    squared error over the reference output's power); a model that returns its raw head values
    in training mode and decoded ones in eval (Ultralytics) is matched on the raw ones. AdamW,
    one-cycle; returns the model in eval mode.
    """
    from edgeslim.components.tasks.detection.qat import output_matching_loss

    ref = copy.deepcopy(reference).eval()
    with training_outputs(model, ref):
        return fit(model, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adamw",
                                      schedule="onecycle", weight_decay=5e-4, warmup=0.15, seed=seed,
                                      recalibrate_batchnorm=recalibrate_batchnorm),
                   x=np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, y=None, teacher=ref,
                   loss_fn=output_matching_loss, progress=progress)


@torch.no_grad()
def output_sqnr_db(model: nn.Module, reference: nn.Module, x, batch: int = 16) -> float:
    """SQNR in dB of ``model``'s deployable outputs against ``reference``'s over ``x`` (a batch at a time)."""
    from edgeslim.components.common.model_outputs import forward_tensors
    from edgeslim.components.common.onnx_runtime import SqnrAccumulator

    acc = SqnrAccumulator()
    model.eval(), reference.eval()
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        for r, c in zip(forward_tensors(reference, xb), forward_tensors(model, xb)):
            acc.add(r.numpy(), c.numpy())
    return acc.db()
