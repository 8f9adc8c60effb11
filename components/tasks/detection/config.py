"""The detection task's ``task:`` section.

A detection task configures how raw outputs become boxes (the built-in
decoder for YOLO-style anchor-free heads, or a user ``module:function``) and
the detection gate, which looks at score calibration as well as mAP::

    task:
      kind: detection
      num_classes: 10
      score_threshold: 0.25          # the deployment threshold
      decoder:
        box_encoding: ltrb            # ltrb | xywh (centre offset + log size)
        heads:
          - {box: output_0, cls: output_1, stride: 4}
          - {box: output_2, cls: output_3, stride: 8}
        # or, for one (N, 4+nc, A) output (Ultralytics): {format: yolo-decoded, strides: [8, 16, 32]}
      gate: {max_map_drop: 1.0, max_map50_95_drop: 2.0, max_tp_score_drop: 0.05, max_recall_drop: 2.0}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.tasks import TaskConfig


@dataclasses.dataclass(frozen=True)
class HeadConfig(Config):
    """One level of a YOLO-style anchor-free head.

    Attributes:
        box: ONNX output name of the box map (N, 4, H, W).
        cls: ONNX output name of the class-score map (N, num_classes, H, W).
        stride: input pixels per cell of this level.
    """

    box: str = ""
    cls: str = ""
    stride: int = 8

    def validate(self) -> None:
        if not self.box or not self.cls:
            raise ConfigError("task.decoder.heads[]: each head needs 'box' and 'cls' output names, "
                              "e.g. {box: output_0, cls: output_1, stride: 8}")
        if self.stride < 1:
            raise ConfigError(f"task.decoder.heads[].stride: got {self.stride}; use input pixels per cell (>= 1)")


@dataclasses.dataclass(frozen=True)
class YoloDecoderConfig(Config):
    """The built-in decoder for anchor-free heads (YOLOv8/FCOS style), with NMS in numpy.

    Attributes:
        heads: one entry per level.
        box_encoding: ``ltrb``: left/top/right/bottom distances from the cell centre, in
            strides; ``xywh``: centre offset from the cell centre in strides and log size
            (``w = exp(tw) * stride``).
        scores: ``sigmoid``: the class map already holds probabilities (the sigmoid is in
            the graph); ``logits``: the decoder applies the sigmoid.
        nms_iou: IoU above which a lower-scored box of the same class is suppressed.
        min_score: boxes below it are dropped before NMS (keep it low: mAP needs the tail).
        max_detections: most boxes kept per image.
        format: ``maps``: (box, cls) map pairs per level, listed in ``heads``; ``yolo-decoded``: one
            ``(N, 4+num_classes, A)`` output (Ultralytics' decoded/export form): per anchor the box
            centre, width and height in input pixels, then the class scores (``box_encoding`` and
            ``heads`` do not apply).
        output: ``yolo-decoded``: the ONNX output to read ("": the model's first output).
        strides: ``yolo-decoded``: the levels' strides, finest first (``edgeslim init`` reads them
            from the model); fine-tuning and the report use them. ``maps`` takes them from ``heads``.
    """

    heads: list[HeadConfig] = dataclasses.field(default_factory=list)
    box_encoding: Literal["ltrb", "xywh"] = "ltrb"
    scores: Literal["sigmoid", "logits"] = "sigmoid"
    nms_iou: float = 0.5
    min_score: float = 0.01
    max_detections: int = 100
    format: Literal["maps", "yolo-decoded"] = "maps"
    output: str = ""
    strides: list[int] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "heads": [h.to_dict() for h in self.heads]}

    def validate(self) -> None:
        where = "task.decoder"
        self.require(0.0 < self.nms_iou <= 1.0, "nms_iou", "use an IoU in (0, 1]", section=where)
        self.require(0.0 <= self.min_score < 1.0, "min_score", "use a score in [0, 1)", section=where)
        self.require(self.max_detections >= 1, "max_detections", "use 1 or more", section=where)
        self.require(all(st >= 1 for st in self.strides), "strides", "use input pixels per cell (>= 1)",
                     section=where)


@dataclasses.dataclass(frozen=True)
class DetectionGateConfig(Config):
    """What a detector candidate must keep: mAP and score calibration.

    Attributes:
        max_map_drop: largest allowed drop of mAP@0.5, in points.
        max_map50_95_drop: largest allowed drop of mAP@0.5:0.95, in points: box precision (a
            candidate whose boxes still overlap their objects at IoU 0.5 but no longer fit them
            tightly keeps its mAP@0.5 and fails here).
        max_tp_score_drop: largest allowed drop of the mean true-positive score (a
            collapse of confidence shows here while mAP holds).
        max_recall_drop: largest allowed drop of recall at the deployment threshold, in points.
        min_recall: smallest recall at the deployment threshold, in points (0: no floor).
        confidence: judge each drop by its interval at this level (e.g. 0.95), a paired bootstrap over the
            evaluation images, not by its point estimate: a drop passes when its upper bound is within its
            allowance, and refuses beyond the noise when its lower bound is above it; in between the verdict
            is "not distinguishable from noise at n = <images>", a refusal that says how many images would
            decide. The accuracy-aware search judges its trials the same way. Empty: the point estimates.
    """

    max_map_drop: float = 1.0
    max_map50_95_drop: float = 2.0
    max_tp_score_drop: float = 0.05
    max_recall_drop: float = 2.0
    min_recall: float = 0.0
    confidence: float | None = None

    def validate(self) -> None:
        for key in ("max_map_drop", "max_map50_95_drop", "max_tp_score_drop", "max_recall_drop", "min_recall"):
            if getattr(self, key) < 0:
                raise ConfigError(f"task.gate.{key}: got {getattr(self, key)}; use 0 or more")
        if self.min_recall > 100:
            raise ConfigError(f"task.gate.min_recall: got {self.min_recall}; recall is in points (0..100)")
        if self.confidence is not None and not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"task.gate.confidence: got {self.confidence}; use a level in [0.5, 1), e.g. 0.95, "
                              "or leave it out to judge the point estimates")


_DECODE_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclasses.dataclass(frozen=True)
class DetectionTaskConfig(TaskConfig):
    """A detector: its outputs are decoded to boxes, evaluated by mAP and gated by ``gate``.

    Attributes:
        num_classes: classes of the class head.
        score_threshold: the deployment score threshold (precision/recall are reported at it).
        decoder: the built-in decoder's settings (used when ``decode_fn`` is empty).
        decode_fn: ``module:function`` taking the outputs (a list of numpy arrays in output
            order) and returning per image an (M, 6) array ``[x1, y1, x2, y2, score, class]``.
        loss_fn: ``module:function`` the label-trained stages (distill, prune's fine-tuning) train with:
            ``loss_fn(outputs, targets, model) -> scalar tensor``, ``outputs`` the model's training-mode
            return value, ``targets`` per image a ``(k, 5)`` tensor ``[x1, y1, x2, y2, class]`` in input
            pixels (:mod:`edgeslim.components.tasks.detection.label_loss`). Empty: Ultralytics' own loss for
            an Ultralytics model, edgeslim's detection loss for ``(box, cls)`` map pairs, else label-free
            output matching (prune only).
        gate: the detection gate (replaces the classification checks of ``gate:``).
    """

    kind: Literal["detection"] = "detection"
    num_classes: int = 0
    score_threshold: float = 0.25
    decoder: YoloDecoderConfig = dataclasses.field(default_factory=YoloDecoderConfig)
    decode_fn: str = ""
    loss_fn: str = ""
    gate: DetectionGateConfig = dataclasses.field(default_factory=DetectionGateConfig)

    def validate(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"task.num_classes: got {self.num_classes}; give the detector's class count (>= 1)")
        if not 0.0 < self.score_threshold < 1.0:
            raise ConfigError(f"task.score_threshold: got {self.score_threshold}; use a score in (0, 1), e.g. 0.25")
        if self.loss_fn and not _DECODE_FN.match(self.loss_fn):
            raise ConfigError(f"task.loss_fn: got {self.loss_fn!r}; use 'package.module:function', a function "
                              "loss_fn(outputs, targets, model) returning a scalar tensor")
        if self.decode_fn:
            if not _DECODE_FN.match(self.decode_fn):
                raise ConfigError(f"task.decode_fn: got {self.decode_fn!r}; use 'package.module:function'")
        elif not self.decoder.heads and self.decoder.format == "maps":
            raise ConfigError("task.decoder.heads: empty; list the heads "
                              "({box: OUTPUT, cls: OUTPUT, stride: N} per level), set task.decoder.format: "
                              "yolo-decoded for one (N, 4+num_classes, A) output, or set task.decode_fn")
