"""The label losses a detector of any output format trains with: your own ``task.loss_fn``, and
Ultralytics' own criterion for an Ultralytics model (used without being asked).

The contract of ``task.loss_fn: module:function``::

    def loss_fn(outputs, targets, model) -> torch.Tensor: ...

- ``outputs``: what ``model(x)`` returns for the training batch, in training mode, as it is (a tuple of
  ``(box, cls)`` maps, a dict of raw head values, ...). Ultralytics' ``DetectionModel`` returns its raw
  dict ``{"boxes": (N, 4*reg_max, A), "scores": (N, nc, A) logits, "feats": [per-level maps]}``.
- ``targets``: a list with one float32 tensor per image of the batch, shape ``(k, 5)``:
  ``[x1, y1, x2, y2, class]`` in model-input pixels (the preprocessed tensor's pixels, what a detection
  split's ``y`` holds); ``k`` may be 0. On the device the batch is on.
- ``model``: the module being trained (in training mode): read its strides, class count, etc. from it.
- returns: one scalar tensor with a gradient, the batch's loss (per image, so that it does not grow with
  the batch size: the learning rate is set against it).

It is called inside edgeslim's training loop (:func:`edgeslim.components.transform.train.fit`) by the label-trained detector
stages (distill, prune's fine-tuning), which add their distillation terms from the teacher to it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.errors import ConfigError, EdgeslimError, SourceError

LabelLoss = Callable[[Any, list[torch.Tensor], nn.Module], torch.Tensor]
# Ultralytics criteria that need nothing but boxes and classes (a segmentation or pose model's wants masks
# or keypoints, which detection labels do not have).
ULTRALYTICS_BOX_LOSSES = ("v8DetectionLoss", "E2ELoss", "E2EDetectLoss")


def pad_boxes(labels: Sequence[np.ndarray]) -> torch.Tensor:
    """Per-image ``(k, 5)`` box labels as one ``(N, K, 5)`` tensor that the training loop can index per
    image; rows past an image's ``k`` have class -1 (:func:`unpad_boxes` drops them)."""
    rows = [np.asarray(b, np.float32).reshape(-1, 5) for b in labels]
    out = np.zeros((len(rows), max([len(r) for r in rows] + [1]), 5), np.float32)
    out[..., 4] = -1.0
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def unpad_boxes(padded: torch.Tensor) -> list[torch.Tensor]:
    """:func:`pad_boxes`'s batch back to one ``(k, 5)`` tensor per image."""
    return [t[t[:, 4] >= 0] for t in padded]


def scalar_loss(loss: Any, where: str) -> torch.Tensor:
    """``loss`` as a 0-d tensor, or one line saying what the function returned instead.

    Raises:
        ConfigError: not a one-element tensor, or one without a gradient.
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        raise ConfigError(f"{where} returned {got}; it must return one scalar tensor, the batch's loss "
                          "(reduce it with .mean() or .sum())")
    if not loss.requires_grad:
        raise ConfigError(f"{where} returned a tensor without a gradient; compute it from the outputs with "
                          "torch operations (no .item(), .detach(), numpy or torch.no_grad())")
    return loss.reshape(())


def user_loss(spec: str) -> LabelLoss:
    """The recipe's ``task.loss_fn`` (``module:function``), imported now and checked at every call.

    Raises:
        ConfigError: the module cannot be imported or has no such function (at import); the function
            returns no scalar tensor with a gradient (at the call).
        SourceError: the function raised (one line naming it and its error).
    """
    from edgeslim.components.tasks.detection.runtime import load_user_function

    fn = load_user_function(spec, "task.loss_fn")
    where = f"task.loss_fn {spec!r}"

    def call(outputs: Any, targets: list[torch.Tensor], model: nn.Module) -> torch.Tensor:
        try:
            loss = fn(outputs, targets, model)
        except EdgeslimError:
            raise
        except Exception as exc:  # user code: say whose it is
            raise SourceError(f"{where} raised {type(exc).__name__}: {str(exc)[:160]} (it is called as "
                              "loss_fn(outputs, targets, model); see docs/model-code.md, The training loss)") from None
        return scalar_loss(loss, where)

    return call


def is_ultralytics_detector(model: nn.Module) -> bool:
    """An Ultralytics detection model (YOLOv8, YOLO11, ...), found without importing ``ultralytics``: its
    class comes from that package, it builds its own criterion (``init_criterion``) and its last layer is a
    head with ``nc``, ``reg_max`` and ``stride``."""
    if type(model).__module__.split(".")[0] != "ultralytics" or not callable(getattr(model, "init_criterion", None)):
        return False
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    return head is not None and all(hasattr(head, a) for a in ("nc", "reg_max", "stride"))


def ultralytics_hyperparameters(model: nn.Module):
    """``model.args`` as the namespace Ultralytics' criteria read (``hyp.box``, ``hyp.cls``, ``hyp.dfl``):
    the model's own when it is one (a trainer left it), else ``ultralytics.cfg.DEFAULT_CFG`` updated with
    ``model.args`` when that is a dict (``YOLO(...).model``, a checkpoint's ``train_args``)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.utils import IterableSimpleNamespace

    args = getattr(model, "args", None)
    if not isinstance(args, dict) and all(hasattr(args, k) for k in ("box", "cls", "dfl")):
        return args
    return IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **(args if isinstance(args, dict) else {})})


def ultralytics_criterion(model: nn.Module):
    """``model.init_criterion()`` with :func:`ultralytics_hyperparameters` in ``model.args`` while it is built
    (the model keeps its own ``args``, or none); None when the criterion needs more than boxes."""
    had, before = "args" in vars(model), getattr(model, "args", None)
    model.args = ultralytics_hyperparameters(model)
    try:
        criterion = model.init_criterion()
    finally:
        if had:
            model.args = before
        else:
            del model.args
    return criterion if type(criterion).__name__ in ULTRALYTICS_BOX_LOSSES else None


class UltralyticsLoss:
    """Ultralytics' own training loss of a detection model (``model.init_criterion()``: ``v8DetectionLoss``,
    task-aligned assignment, BCE + CIoU + DFL with the ``box``/``cls``/``dfl`` gains of ``model.args``).

    Called as a ``task.loss_fn``: the boxes become Ultralytics' batch (``batch_idx``, ``cls``, ``bboxes`` as
    xywh normalised to the image size the criterion measures from the feature maps, so the pixels come back
    exact). Ultralytics returns its (box, cls, dfl) losses times the batch size; this returns their sum per
    image.
    """

    def __init__(self, model: nn.Module):
        self.criterion = ultralytics_criterion(model)
        if self.criterion is None:
            raise ConfigError(f"{type(model).__name__}: Ultralytics' criterion for it needs more than box labels")
        self.name = f"ultralytics {type(self.criterion).__name__}"
        hyp = self.criterion.one2many.hyp if hasattr(self.criterion, "one2many") else self.criterion.hyp
        self.gains = {k: float(getattr(hyp, k)) for k in ("box", "cls", "dfl")}

    def _device(self) -> torch.device:
        c = getattr(self.criterion, "one2many", self.criterion)
        return torch.device(c.device)

    def __call__(self, outputs: Any, targets: list[torch.Tensor], model: nn.Module) -> torch.Tensor:
        preds = outputs[1] if isinstance(outputs, tuple) else outputs
        first = preds.get("one2many", preds)["feats"][0]
        if first.device != self._device():  # trained on another device than the one it was built on
            self.criterion = ultralytics_criterion(model)
        stride = float(torch.as_tensor(model.model[-1].stride).reshape(-1)[0])
        h, w = (float(v) * stride for v in first.shape[-2:])
        boxes = torch.cat([t.reshape(-1, 5) for t in targets]).to(first.device, torch.float32) if targets else \
            first.new_zeros((0, 5))
        index = torch.cat([torch.full((len(t),), float(i)) for i, t in enumerate(targets)]) if targets else \
            torch.zeros(0)
        x1, y1, x2, y2 = boxes[:, :4].unbind(1)
        batch = {"batch_idx": index.to(first.device), "cls": boxes[:, 4:5],
                 "bboxes": torch.stack([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], 1)}
        loss, _ = self.criterion(outputs, batch)
        return loss.sum() / max(len(targets), 1)
