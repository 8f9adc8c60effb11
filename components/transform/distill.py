"""Knowledge distillation: logit KD and feature KD, plus the training loop the
compression stages share (pruning fine-tune and QAT use it too).

``distill(model, config, *, data, teacher)`` trains a student to imitate the
teacher. The student is the previous stage's output, the teacher's own
architecture at a width multiplier (built by structural pruning), or another
registered model.
"""

from __future__ import annotations

import copy
import difflib
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, DataError, SourceError
from edgeslim.components.reference.digits import augment, top1
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import FeatureDistillConfig, LogitDistillConfig

Progress = Callable[[int, int, float], None]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
            labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Hinton's distillation loss: ``alpha * T^2 * KL(t || s) + (1 - alpha) * CE(s, y)``.

    The T^2 factor keeps the soft-target gradients on the same scale as the
    hard-label ones when T changes.
    """
    hard = nn.functional.cross_entropy(student_logits, labels)
    if teacher_logits is None or alpha == 0.0:
        return hard
    t = temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)
    return alpha * soft + (1.0 - alpha) * hard


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, name: str, lr: float, total_steps: int):
    total_steps = max(1, total_steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[total_steps // 2, (3 * total_steps) // 4], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class FeatureTap:
    """Keeps the outputs of named modules of a model during forward passes."""

    def __init__(self, model: nn.Module, names: list[str], role: str):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            if name not in modules or name == "":
                known = [n for n in modules if n]
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                hint = f"close matches: {', '.join(close)}" if close else \
                    f"its modules are: {', '.join(known[:12])}{', ...' if len(known) > 12 else ''}"
                raise ConfigError(
                    f"distill(feature).layer_pairs: the {role} has no layer {name!r}; {hint}"
                )
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _adapter(s_feat: torch.Tensor, t_feat: torch.Tensor) -> nn.Module:
    """A learned map from a student feature to the teacher's shape (identity when equal)."""
    if s_feat.shape[1:] == t_feat.shape[1:]:
        return nn.Identity()
    if s_feat.dim() == 4 and t_feat.dim() == 4:
        conv = nn.Conv2d(s_feat.shape[1], t_feat.shape[1], 1, bias=False)
        if s_feat.shape[2:] == t_feat.shape[2:]:
            return conv
        return nn.Sequential(conv, nn.AdaptiveAvgPool2d(tuple(t_feat.shape[2:])))
    if s_feat.dim() == 2 and t_feat.dim() == 2:
        return nn.Linear(s_feat.shape[1], t_feat.shape[1], bias=False)
    raise ConfigError(
        f"distill(feature).layer_pairs: cannot match a student feature of shape "
        f"{tuple(s_feat.shape[1:])} to a teacher feature of shape {tuple(t_feat.shape[1:])}; "
        "pair layers of the same kind (both conv maps or both vectors)"
    )


def fit(student: nn.Module, *, x: np.ndarray, y: np.ndarray, teacher: nn.Module | None = None,
        epochs: int, lr: float, batch_size: int = 64, optimizer: str = "adamw",
        schedule: str = "onecycle", weight_decay: float = 1e-4, temperature: float = 4.0,
        alpha: float = 0.7, seed: int = 0, feature_pairs: list[list[str]] | None = None,
        feature_weight: float = 1.0, progress: Progress | None = None,
        loss_fn: Callable[[Any, Any, Any], torch.Tensor] | None = None) -> nn.Module:
    """Train ``student`` in place, optionally distilled from ``teacher``; return it in eval mode.

    Args:
        student: the model trained (changed in place; pass a copy to keep the original).
        x: training inputs.
        y: integer class labels (``None`` with a ``loss_fn`` that needs no labels).
        teacher: the model imitated (frozen, eval mode); None for plain training.
        epochs: passes over ``x``.
        lr: peak learning rate.
        feature_pairs: ``[[teacher layer, student layer], ...]`` for feature KD.
        progress: called with (epoch, epochs, last loss) after each epoch.
        loss_fn: ``(student outputs, teacher outputs or None, labels batch or None) -> loss``
            instead of the classification/KD loss (e.g. a detector's output matching).

    Raises:
        DataError: there are no training samples.
    """
    if len(x) == 0:
        raise DataError("training data: the train split is empty; training needs samples")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = None if y is None else torch.from_numpy(np.asarray(y)).long()
    params = list(student.parameters())
    adapters = nn.ModuleList()
    s_tap = t_tap = None
    if feature_pairs:
        if teacher is None:
            raise ConfigError("distill(feature): feature distillation needs a teacher")
        t_tap = FeatureTap(teacher, [p[0] for p in feature_pairs], "teacher")
        s_tap = FeatureTap(student, [p[1] for p in feature_pairs], "student")
        with torch.no_grad():
            student.eval()
            probe = xt[:2]
            teacher(probe)
            student(probe)
        for t_name, s_name in feature_pairs:
            adapters.append(_adapter(s_tap.outputs[s_name], t_tap.outputs[t_name]))
        params += list(adapters.parameters())
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = make_optimizer(params, optimizer, lr, weight_decay)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = make_scheduler(opt, schedule, lr, epochs * steps_per_epoch)
    # Random one-pixel shifts only make sense for image batches (N, C, H, W).
    image = xt.dim() == 4
    try:
        for epoch in range(epochs):
            student.train()
            adapters.train()
            perm = torch.randperm(len(xt), generator=gen)
            loss = torch.zeros(())
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                xb = augment(xt[idx], gen) if image else xt[idx]
                s_out = student(xb)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)
                yb = None if yt is None else yt[idx]
                if loss_fn is not None:
                    loss = loss_fn(s_out, t_out, yb)
                else:
                    loss = kd_loss(s_out, t_out, yb, temperature, alpha if teacher is not None else 0.0)
                if feature_pairs:
                    for adapter, (t_name, s_name) in zip(adapters, feature_pairs):
                        loss = loss + feature_weight * nn.functional.mse_loss(
                            adapter(s_tap.outputs[s_name]), t_tap.outputs[t_name].detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            if progress:
                progress(epoch + 1, epochs, float(loss.detach()))
    finally:
        if s_tap:
            s_tap.remove()
        if t_tap:
            t_tap.remove()
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(True)
    return student.eval()


def check_output_shape(student: nn.Module, teacher: nn.Module, example: torch.Tensor,
                       what: str) -> None:
    """Refuse a student whose output shape is not the teacher's (KD needs the same outputs)."""
    with torch.no_grad():
        s = student.eval()(example)
        t = teacher.eval()(example)
    if not isinstance(s, torch.Tensor) or s.shape != t.shape:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ConfigError(
            f"distill: the student ({what}) outputs shape {got} but the teacher outputs "
            f"{tuple(t.shape)}; pick a student with the teacher's outputs (same number of classes)"
        )


def load_registered_student(uri: str) -> nn.Module:
    """Load a registered PyTorch model from MLflow (the tracking URI comes from the environment)."""
    import mlflow

    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:  # mlflow raises many types; the user needs the URI and the reason
        raise SourceError(
            f"distill.student_uri {uri}: cannot load it ({type(exc).__name__}: {str(exc)[:160]}); "
            "check the name/alias and MLFLOW_TRACKING_URI, and that it was logged with "
            "mlflow.pytorch.log_model(..., serialization_format='pickle')"
        ) from None
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise SourceError(
            f"distill.student_uri {uri}: loaded a {type(model).__name__}, not a trainable module; "
            "log it with mlflow.pytorch.log_model(..., serialization_format='pickle')"
        )
    return model


def build_student(model: nn.Module, config: LogitDistillConfig, *, teacher: nn.Module,
                  example: torch.Tensor) -> tuple[nn.Module, str]:
    """The student the config asks for, as a fresh copy, and a short description of it."""
    if config.student == "uri":
        return load_registered_student(config.student_uri), config.student_uri
    if config.student == "width":
        from edgeslim.components.transform.prune import shrink_to_width

        return shrink_to_width(teacher, config.width, example=example), f"teacher@width{config.width:g}"
    return copy.deepcopy(model), "previous stage"


def distill(model: nn.Module, config: LogitDistillConfig, *, data: Splits, teacher: nn.Module,
            progress: Progress | None = None) -> StageResult:
    """Train a student to imitate ``teacher``; neither input is changed.

    Args:
        model: the previous stage's output (the student when ``config.student`` is ``previous``).
        config: a ``LogitDistillConfig`` or ``FeatureDistillConfig``.
        data: the splits; training uses ``train``, metrics ``val`` and ``test``.
        teacher: the fp32 model distilled from.
        progress: called with (epoch, epochs, loss).

    Returns:
        StageResult with the trained student, top-1 of student and teacher,
        parameter and MAC counts.

    Raises:
        ConfigError: a feature-KD layer is missing, or the student's output shape
            differs from the teacher's.
        SourceError: a student URI cannot be loaded.
    """
    start = time.perf_counter()
    example = torch.from_numpy(data.x_train[:2])
    teacher = copy.deepcopy(teacher).eval()
    student, what = build_student(model, config, teacher=teacher, example=example)
    check_output_shape(student, teacher, example, what)
    from edgeslim.components.transform.prune import count_macs_params

    before = top1(student, data.x_val, data.y_val)
    pairs = config.layer_pairs if isinstance(config, FeatureDistillConfig) else None
    fit(student, x=data.x_train, y=data.y_train, teacher=teacher, epochs=config.epochs,
        lr=config.lr, batch_size=config.batch_size, optimizer=config.optimizer,
        schedule=config.schedule, weight_decay=config.weight_decay,
        temperature=config.temperature, alpha=config.alpha, seed=config.seed,
        feature_pairs=pairs, feature_weight=getattr(config, "feature_weight", 0.0),
        progress=progress)
    macs, params = count_macs_params(student, example[:1])
    t_macs, t_params = count_macs_params(teacher, example[:1])
    metrics = {
        "student_top1_val_before": before,
        "student_top1_val": top1(student, data.x_val, data.y_val),
        "student_top1_test": top1(student, data.x_test, data.y_test),
        "teacher_top1_test": top1(teacher, data.x_test, data.y_test),
        "student_macs": macs, "student_params": params,
        "teacher_macs": t_macs, "teacher_params": t_params,
    }
    lineage = {"stage": "distill", "config": config.to_json_dict(), "student": what,
               "data_digest": data.digest()}
    return StageResult(student, metrics, lineage, time.perf_counter() - start)
