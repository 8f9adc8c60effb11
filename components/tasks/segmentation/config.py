"""The segmentation task's ``task:`` section, for semantic (``format: semantic``) and instance
(``format: yolo-seg``) segmentation.

A semantic segmenter gives per-pixel class logits ``(N, C, H, W)``; its masks are their argmax. It is
judged by mIoU and pixel accuracy against the labels' masks, and gated on the mIoU drop and a floor on
the worst class's IoU::

    task:
      kind: segmentation
      num_classes: 4                 # channels of the logits, class 0 usually background
      ignore_index: 255              # label pixels that count for no class
      gate: {max_miou_drop: 1.0, min_class_iou: 0.0, max_pixel_accuracy_drop: 1.0}

An instance segmenter (Ultralytics' YOLOv8-seg / YOLO11-seg, ``YOLO("best.pt").model`` in eval mode) gives the
decoded ``(N, 4 + classes + 32, A)`` and the prototype masks ``(N, 32, H/4, W/4)``; its boxes and masks are
decoded in numpy (:mod:`.instance`), judged by box and mask mAP (COCO-style, masks matched by mask IoU), and
gated on the mask mAP drops and the mean true-positive score::

    task:
      kind: segmentation
      format: yolo-seg
      num_classes: 3
      score_threshold: 0.25
      decoder: {nms_iou: 0.7, min_score: 0.01, max_detections: 100, mask_threshold: 0.5}
      gate: {max_mask_map_drop: 1.0, max_mask_map50_95_drop: 1.0, max_tp_score_drop: 0.05}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.tasks import TaskConfig


@dataclasses.dataclass(frozen=True)
class SegmentationGateConfig(Config):
    """What a segmenter candidate must keep.

    Attributes:
        max_miou_drop: largest allowed drop of the mean IoU over classes, in points.
        min_class_iou: smallest IoU of any class the test split holds, in points (0: no floor). A class
            that int8 wipes out (a thin or rare one) barely moves the mean; this floor catches it.
        max_pixel_accuracy_drop: largest allowed drop of pixel accuracy, in points.
        max_mask_map_drop: ``yolo-seg``: largest allowed drop of mask mAP@0.5, in points.
        max_mask_map50_95_drop: ``yolo-seg``: largest allowed drop of mask mAP@0.5:0.95, in points (masks that
            still overlap their objects but lost their outline fail here).
        max_tp_score_drop: ``yolo-seg``: largest allowed drop of the mean true-positive score (a collapse of
            confidence shows here while mAP holds).
    """

    max_miou_drop: float = 1.0
    min_class_iou: float = 0.0
    max_pixel_accuracy_drop: float = 1.0
    max_mask_map_drop: float = 1.0
    max_mask_map50_95_drop: float = 1.0
    max_tp_score_drop: float = 0.05

    def validate(self) -> None:
        for key in ("max_miou_drop", "min_class_iou", "max_pixel_accuracy_drop", "max_mask_map_drop",
                    "max_mask_map50_95_drop", "max_tp_score_drop"):
            self.require(getattr(self, key) >= 0, key, "use 0 or more", section="task.gate")
        self.require(self.min_class_iou <= 100, "min_class_iou", "IoU is in points (0..100)", section="task.gate")


@dataclasses.dataclass(frozen=True)
class InstanceDecoderConfig(Config):
    """The built-in decoder of ``yolo-seg`` outputs (:mod:`.instance`).

    Attributes:
        output: the decoded ``(N, 4+classes+nm, A)`` output ("": the model's 3-d output).
        proto: the prototype ``(N, nm, h, w)`` output ("": the model's 4-d output).
        nms_iou: IoU above which a lower-scored box of the same class is suppressed.
        min_score: anchors below it are dropped before NMS (keep it low: mAP needs the tail).
        max_detections: most instances kept per image.
        mask_threshold: a pixel belongs to an instance where its mask probability reaches it.
    """

    output: str = ""
    proto: str = ""
    nms_iou: float = 0.7
    min_score: float = 0.01
    max_detections: int = 100
    mask_threshold: float = 0.5

    def validate(self) -> None:
        where = "task.decoder"
        self.require(0.0 < self.nms_iou <= 1.0, "nms_iou", "use an IoU in (0, 1]", section=where)
        self.require(0.0 <= self.min_score < 1.0, "min_score", "use a score in [0, 1)", section=where)
        self.require(self.max_detections >= 1, "max_detections", "use 1 or more", section=where)
        self.require(0.0 < self.mask_threshold < 1.0, "mask_threshold", "use a probability in (0, 1)", section=where)


_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclasses.dataclass(frozen=True)
class SegmentationTaskConfig(TaskConfig):
    """A segmenter: per-pixel logits, judged by mIoU and gated by ``gate``.

    Attributes:
        format: ``semantic``: per-pixel logits; ``yolo-seg``: Ultralytics' decoded output and prototypes.
        num_classes: classes of the logits (``C`` of ``(N, C, H, W)``), or of the ``yolo-seg`` head.
        output: ``semantic``: the ONNX output holding the logits ("": the model's first output).
        ignore_index: ``semantic``: label value of pixels that belong to no class (borders, "don't care").
        score_threshold: ``yolo-seg``: the deployment score threshold (precision/recall are reported at it).
        decoder: ``yolo-seg``: the decoder's settings.
        loss_fn: ``yolo-seg``: ``module:function`` the label-trained stages train with,
            ``loss_fn(outputs, targets, model) -> scalar tensor`` (``targets``: per image the ``(k, H, W)``
            instance label); empty: Ultralytics' own ``v8SegmentationLoss``.
        gate: the segmentation gate (replaces the classification checks of ``gate:``).
    """

    kind: Literal["segmentation"] = "segmentation"
    format: Literal["semantic", "yolo-seg"] = "semantic"
    num_classes: int = 0
    output: str = ""
    ignore_index: int = 255
    score_threshold: float = 0.25
    decoder: InstanceDecoderConfig = dataclasses.field(default_factory=InstanceDecoderConfig)
    loss_fn: str = ""
    gate: SegmentationGateConfig = dataclasses.field(default_factory=SegmentationGateConfig)
    quantize_methods = ("ptq", "auto")  # no QAT twin: the search skips QAT and says so

    @property
    def instance(self) -> bool:
        return self.format == "yolo-seg"

    def validate(self) -> None:
        if self.instance:
            self.require(self.num_classes >= 1, "num_classes", "give the head's class count (>= 1)", section="task")
            self.require(0.0 < self.score_threshold < 1.0, "score_threshold", "use a score in (0, 1), e.g. 0.25",
                         section="task")
            if self.loss_fn and not _FUNCTION.match(self.loss_fn):
                raise ConfigError(f"task.loss_fn: got {self.loss_fn!r}; use 'package.module:function', a function "
                                  "loss_fn(outputs, targets, model) returning a scalar tensor")
            return
        if self.num_classes < 2:
            raise ConfigError(f"task.num_classes: got {self.num_classes}; give the logits' class count "
                              "(>= 2, background included)")
        if 0 <= self.ignore_index < self.num_classes:
            raise ConfigError(f"task.ignore_index: got {self.ignore_index}, which is class {self.ignore_index} of "
                              f"{self.num_classes}; use a label value no class has (e.g. 255)")
