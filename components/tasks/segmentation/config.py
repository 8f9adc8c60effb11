"""The segmentation task's ``task:`` section.

A semantic segmenter gives per-pixel class logits ``(N, C, H, W)``; its masks are their argmax. It is
judged by mIoU and pixel accuracy against the labels' masks, and gated on the mIoU drop and a floor on
the worst class's IoU::

    task:
      kind: segmentation
      num_classes: 4                 # channels of the logits, class 0 usually background
      ignore_index: 255              # label pixels that count for no class
      gate: {max_miou_drop: 1.0, min_class_iou: 0.0, max_pixel_accuracy_drop: 1.0}
"""

from __future__ import annotations

import dataclasses
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
    """

    max_miou_drop: float = 1.0
    min_class_iou: float = 0.0
    max_pixel_accuracy_drop: float = 1.0

    def validate(self) -> None:
        for key in ("max_miou_drop", "min_class_iou", "max_pixel_accuracy_drop"):
            self.require(getattr(self, key) >= 0, key, "use 0 or more", section="task.gate")
        self.require(self.min_class_iou <= 100, "min_class_iou", "IoU is in points (0..100)", section="task.gate")


@dataclasses.dataclass(frozen=True)
class SegmentationTaskConfig(TaskConfig):
    """A segmenter: per-pixel logits, judged by mIoU and gated by ``gate``.

    Attributes:
        num_classes: classes of the logits (``C`` of ``(N, C, H, W)``).
        output: the ONNX output holding the logits ("": the model's first output).
        ignore_index: label value of pixels that belong to no class (borders, "don't care").
        gate: the segmentation gate (replaces the classification checks of ``gate:``).
    """

    kind: Literal["segmentation"] = "segmentation"
    num_classes: int = 0
    output: str = ""
    ignore_index: int = 255
    gate: SegmentationGateConfig = dataclasses.field(default_factory=SegmentationGateConfig)
    quantize_methods = ("ptq", "auto")  # no QAT twin: the search skips QAT and says so

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"task.num_classes: got {self.num_classes}; give the logits' class count "
                              "(>= 2, background included)")
        if 0 <= self.ignore_index < self.num_classes:
            raise ConfigError(f"task.ignore_index: got {self.ignore_index}, which is class {self.ignore_index} of "
                              f"{self.num_classes}; use a label value no class has (e.g. 255)")
