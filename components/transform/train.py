"""The one training loop: plain training, logit and feature distillation, a task's own loss.

Distillation, pruning's fine-tuning, QAT and the reference models all train with :func:`fit`, whose
settings are one :class:`TrainConfig`.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.errors import ConfigError, DataError

Progress = Callable[[int, int, float], None]
# Called by every fit() after each epoch with (epoch, epochs, mean loss per sample of the epoch): see epoch_losses().
_EPOCH_LISTENERS: list[Progress] = []


@contextlib.contextmanager
def epoch_losses(on_epoch: Progress | None = None) -> Iterator[list[float]]:
    """The training curve of every :func:`fit` run inside the block: one mean loss per epoch, in order.

    A stage that trains inside another (QAT inside the quantize search, pruning's fine-tuning)
    reports its epochs here without a callback threaded through it; the pipeline's tasks record
    their curves this way. ``on_epoch(epoch, epochs, mean loss)`` is called as they come.
    """
    losses: list[float] = []

    def listen(epoch: int, epochs: int, loss: float) -> None:
        losses.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, epochs, loss)

    _EPOCH_LISTENERS.append(listen)
    try:
        yield losses
    finally:
        _EPOCH_LISTENERS.remove(listen)


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


def make_scheduler(opt: torch.optim.Optimizer, name: str, lr: float, total_steps: int, warmup: float = 0.3):
    total_steps = max(1, total_steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=warmup)
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


def _as_targets(y):
    """Labels as tensors: an integer array becomes a LongTensor; tensors and their lists/dicts stay."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        return {k: _as_targets(v) for k, v in y.items()}
    if isinstance(y, (list, tuple)) and y and isinstance(y[0], (dict, list, tuple, torch.Tensor)):
        return type(y)(_as_targets(v) for v in y)
    return torch.from_numpy(np.asarray(y)).long()


def _to(y, device: torch.device):
    """Targets made by :func:`_as_targets` (tensors, or their lists/dicts) on ``device``."""
    if isinstance(y, dict):
        return {k: _to(v, device) for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return type(y)(_to(v, device) for v in y)
    return y.to(device, non_blocking=True) if isinstance(y, torch.Tensor) else y


def training_device(requested: str | None = None) -> torch.device:
    """Where :func:`fit` trains: ``requested``, else ``$EDGESLIM_DEVICE``, else the first CUDA device
    torch sees (a GPU node of the cluster), else the CPU.

    Raises:
        ConfigError: a device name torch does not know, or CUDA asked for where torch sees none.
    """
    import os

    name = requested or os.environ.get("EDGESLIM_DEVICE", "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"EDGESLIM_DEVICE: {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"EDGESLIM_DEVICE: {name!r} asked for, but this torch sees no CUDA device "
                          f"(torch {torch.__version__}); use a CUDA build of torch on a GPU node, or unset it")
    return device


def _take(y, idx: torch.Tensor):
    """The batch ``idx`` of targets made by :func:`_as_targets`."""
    if isinstance(y, dict):
        return {k: _take(v, idx) for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return type(y)(_take(v, idx) for v in y)
    return y[idx]


class _LazyRows:
    """A lazy split (e.g. ``LazyImages``) indexed by torch index tensors, giving float32 tensors."""

    def __init__(self, x):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = idx.numpy() if isinstance(idx, torch.Tensor) else idx
        return torch.from_numpy(np.ascontiguousarray(self.x[idx], dtype=np.float32))


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift an image batch (N, C, H, W) by up to one pixel, the same shift for the whole batch.

    The digits reference models train with it; other inputs pass through unchanged.
    """
    if x.dim() != 4:
        return x
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image of a batch (N, C, H, W) left-right with probability 1/2; other inputs pass unchanged."""
    if x.dim() != 4:
        return x
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "shift": random_shift, "hflip": random_hflip}


def augmentation(names: Sequence[str]) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The recipe's ``augment`` list as one batch transform for :func:`fit` (None: no augmentation)."""
    steps = [AUGMENTATIONS[n] for n in names]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def chain(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, gen)
        return x

    return chain


# BatchNorm running statistics still holding more than this share of where they started count as stale.
STALE_BATCHNORM = 0.01
RECALIBRATION_SAMPLES = 1024


@torch.no_grad()
def recalibrate_stale_batchnorm(model: nn.Module, xt, steps: int, batch_size: int,
                                device: torch.device | None = None) -> int:
    """After ``steps`` training steps, give BatchNorm layers whose running statistics cannot have
    caught up (``(1 - momentum) ** steps > STALE_BATCHNORM``: torchvision's MobileNetV3 and
    EfficientNet use momentum 0.01, so a short fine-tune leaves eval mode on the old statistics)
    the plain average over up to ``RECALIBRATION_SAMPLES`` training inputs. Layers that trained long
    enough are left exactly as they are. Returns how many layers were recalibrated."""
    stale = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.momentum is not None and (1.0 - m.momentum) ** steps > STALE_BATCHNORM]
    if not stale:
        return 0
    momenta = [m.momentum for m in stale]
    for m in stale:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    fresh = {id(m) for m in stale}
    others = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in fresh]
    model.train()
    for m in others:  # keep what trained long enough exactly as it is
        m.eval()
    n = min(len(xt), RECALIBRATION_SAMPLES)
    for i in range(0, n, batch_size):
        model(xt[i:min(i + batch_size, n)].to(device or "cpu"))
    for m, momentum in zip(stale, momenta):
        m.momentum = momentum
    model.eval()
    return len(stale)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one :func:`fit` run: everything that decides the trained weights besides the
    model, the data and the loss.

    Attributes:
        epochs: passes over the training inputs.
        lr: peak learning rate.
        batch_size: samples per step.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (:func:`make_optimizer`).
        schedule: ``onecycle``, ``cosine``, ``step`` or ``constant`` (:func:`make_scheduler`).
        weight_decay: the optimizer's weight decay.
        warmup: share of the steps the one-cycle schedule spends rising to ``lr``.
        temperature: the distillation temperature of :func:`kd_loss`.
        alpha: the soft targets' share of :func:`kd_loss` (with a teacher).
        feature_pairs: ``((teacher layer, student layer), ...)`` for feature KD; None for none.
        feature_weight: the weight of each feature pair's squared error in the loss.
        seed: seeds torch's global generator and the loop's own (batch order, augmentation).
        augment: ``(input batch, generator) -> input batch`` applied to every training batch
            (e.g. :func:`random_shift`, or :func:`augmentation` of a recipe's list); None trains on
            the inputs as they are.
        device: where to train (:func:`training_device`: a GPU when torch sees one). The batches
            move there one at a time; the student (and teacher) come back on the CPU.
        recalibrate_batchnorm: at the end, give stale BatchNorm statistics the training inputs'
            average (:func:`recalibrate_stale_batchnorm`). Pruning asks for it: its short fine-tunes
            follow a change of architecture. QAT must not: its fake-quant model keeps the statistics
            its Q/DQ twin was calibrated with.
    """

    epochs: int
    lr: float
    batch_size: int = 64
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    weight_decay: float = 1e-4
    warmup: float = 0.3
    temperature: float = 4.0
    alpha: float = 0.7
    feature_pairs: Sequence[Sequence[str]] | None = None
    feature_weight: float = 1.0
    seed: int = 0
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    device: str | None = None
    recalibrate_batchnorm: bool = False

    def __post_init__(self) -> None:
        pairs = tuple(tuple(p) for p in self.feature_pairs) if self.feature_pairs else None
        object.__setattr__(self, "feature_pairs", pairs)


def fit(student: nn.Module, config: TrainConfig, *, x: np.ndarray, y: np.ndarray,
        teacher: nn.Module | None = None, loss_fn: Callable[[Any, Any, Any], torch.Tensor] | None = None,
        progress: Progress | None = None) -> nn.Module:
    """Train ``student`` in place as ``config`` says, optionally distilled from ``teacher``; return it
    in eval mode.

    Args:
        student: the model trained (changed in place; pass a copy to keep the original).
        config: the loop's settings (:class:`TrainConfig`).
        x: training inputs: a numpy array, or a lazy split read one batch at a time.
        y: integer class labels, or for a ``loss_fn`` any targets indexed per sample (a tensor, or
            lists/dicts of tensors whose first axis is the sample); ``None`` when it needs none.
        teacher: the model imitated (frozen, eval mode); None for plain training.
        loss_fn: ``(student outputs, teacher outputs or None, labels batch or None) -> loss``
            instead of the classification/KD loss (e.g. a detector's output matching).
        progress: called with (epoch, epochs, mean loss of the epoch) after each epoch.

    The loss of an epoch is the mean loss per training sample: each batch's loss (a mean over its
    samples) weighted by the batch's size, over the epoch. Every figure of a training loss is this
    one: the progress line, :func:`epoch_losses`, the stages' final losses, the report's training
    curves and the MLflow metrics ``train.<stage>.loss``.

    Raises:
        DataError: there are no training samples.
    """
    c = config
    epochs, batch_size, feature_pairs, augment = c.epochs, c.batch_size, c.feature_pairs, c.augment
    if len(x) == 0:
        raise DataError("training data: the train split is empty; training needs samples")
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    dev = training_device(c.device)
    student.to(dev)
    if teacher is not None:
        teacher.to(dev)
    # A numpy split goes to torch once; a lazy one (image files) is read a batch at a time.
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else _LazyRows(x)
    yt = None if y is None else _as_targets(y)
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
            probe = xt[:2].to(dev)
            teacher(probe)
            student(probe)
        for t_name, s_name in feature_pairs:
            adapters.append(_adapter(s_tap.outputs[s_name], t_tap.outputs[t_name]))
        adapters.to(dev)
        params += list(adapters.parameters())
    # The teacher's trainable parameters, frozen while it teaches; a fixed one (YOLO's DFL) stays fixed after.
    thawed = [p for p in teacher.parameters() if p.requires_grad] if teacher is not None else []
    if teacher is not None:
        teacher.eval()
        for p in thawed:
            p.requires_grad_(False)
    opt = make_optimizer(params, c.optimizer, c.lr, c.weight_decay)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = make_scheduler(opt, c.schedule, c.lr, epochs * steps_per_epoch, c.warmup)
    try:
        for epoch in range(epochs):
            student.train()
            adapters.train()
            perm = torch.randperm(len(xt), generator=gen)
            total = torch.zeros((), dtype=torch.float64, device=dev)
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                xb = xt[idx].to(dev, non_blocking=True)
                xb = augment(xb, gen) if augment is not None else xb
                s_out = student(xb)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)
                yb = None if yt is None else _to(_take(yt, idx), dev)
                if loss_fn is not None:
                    loss = loss_fn(s_out, t_out, yb)
                else:
                    loss = kd_loss(s_out, t_out, yb, c.temperature, c.alpha if teacher is not None else 0.0)
                if feature_pairs:
                    for adapter, (t_name, s_name) in zip(adapters, feature_pairs):
                        loss = loss + c.feature_weight * nn.functional.mse_loss(
                            adapter(s_tap.outputs[s_name]), t_tap.outputs[t_name].detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach().double() * len(idx)
            mean = float(total) / len(xt)  # the epoch's loss, printed, recorded and logged alike
            for listen in list(_EPOCH_LISTENERS):
                listen(epoch + 1, epochs, mean)
            if progress:
                progress(epoch + 1, epochs, mean)
        if c.recalibrate_batchnorm:
            recalibrate_stale_batchnorm(student, xt, epochs * steps_per_epoch, batch_size, dev)
    finally:
        if s_tap:
            s_tap.remove()
        if t_tap:
            t_tap.remove()
        for p in thawed:
            p.requires_grad_(True)
        if dev.type != "cpu":  # the stages after training (export, ONNX, saving) work on the CPU
            student.to("cpu")
            if teacher is not None:
                teacher.to("cpu")
    return student.eval()
