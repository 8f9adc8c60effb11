"""The segmentation task, semantic and instance (``task.format``).

Semantic (``semantic``): per-pixel logits ``(N, C, H, W)`` turned into masks by their argmax
(:mod:`.runtime`), judged by mIoU, pixel accuracy and per-class IoU (:mod:`.evaluate`), searched by its
output-tail-aware strategy (:mod:`.search`), distilled pixel-wise (:mod:`.train`), reported with per-class
IoU and mask overlays (:mod:`.report`). Its data provider, ``masks`` (:mod:`.data`), reads images beside
class-map PNGs.

Instance (``yolo-seg``, Ultralytics' YOLOv8-seg / YOLO11-seg): the decoded output and the prototype masks
decoded to scored boxes and masks in numpy (:mod:`.instance`), judged by box and mask mAP
(:mod:`.instance_eval`), trained with Ultralytics' ``v8SegmentationLoss`` with the segmentation head kept
whole (:mod:`.train_instance`).

Both are gated by ``task.gate``.

This module and :mod:`.config` and :mod:`.runtime` import no torch at module level: the device agent loads
the task through the registry to read its runtime half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeslim.components.tasks.segmentation.config import SegmentationTaskConfig
from edgeslim.components.tasks.segmentation.runtime import SegmentationRuntime


class SegmentationTask:
    kind = "segmentation"
    config_class = SegmentationTaskConfig
    runtime = SegmentationRuntime
    metric_label = "mIoU"  # the task metric, as the report names it
    labels = ("class maps: y_* integer arrays of shape (N, H, W), one class id per input pixel; or instances: y_* "
              "object arrays, y[i] a (k, H, W) uint8 stack whose instance j holds its class + 1")

    def __init__(self, config: SegmentationTaskConfig):
        self.config = config

    @classmethod
    def recognises(cls, splits) -> bool:
        import numpy as np

        y = splits.y_train
        if not len(y):
            return False
        if np.dtype(y.dtype) == object:  # instances: per image a (k, H, W) stack
            return np.asarray(y[0]).ndim == 3
        return getattr(y, "ndim", np.ndim(y)) == 3 and np.issubdtype(np.dtype(y.dtype), np.integer)

    @classmethod
    def init_recipe(cls, *, source: str, output: Path, data: str, edge_name: str, splits,
                    load_model: Callable) -> str:
        from edgeslim.components.tasks.segmentation.init import init_recipe

        return init_recipe(source=source, output=output, data=data, edge_name=edge_name, splits=splits,
                           load_model=load_model)

    def transform(self, model, stages, *, data, progress: Callable | None = None):
        from edgeslim.components.tasks.segmentation.train import apply_segmenter_stages

        if self.config.instance:
            from edgeslim.components.tasks.segmentation.train_instance import (distill_instance_segmenter,
                                                                               prune_instance_segmenter)

            return apply_segmenter_stages(model, stages, data=data, task=self.config, progress=progress,
                                          distill=distill_instance_segmenter, prune=prune_instance_segmenter)
        return apply_segmenter_stages(model, stages, data=data, task=self.config, progress=progress)

    def search_strategy(self, *, fp32_onnx, reference_onnx, recipe, model=None):
        from edgeslim.components.tasks.segmentation.search import InstanceStrategy, SegmenterStrategy

        # Trials are judged against the segmenter's own fp32 export (what the int8 step changes).
        return (InstanceStrategy if self.config.instance else SegmenterStrategy)(fp32_onnx, self.config, model=model)

    def evaluate(self, candidate_onnx, config, *, parent_onnx, data, student_onnx=None):
        if self.config.instance:
            from edgeslim.components.tasks.segmentation.instance_eval import evaluate_instances

            return evaluate_instances(candidate_onnx, config, parent_onnx=parent_onnx, data=data, task=self.config)
        from edgeslim.components.tasks.segmentation.evaluate import evaluate_segmentation

        return evaluate_segmentation(candidate_onnx, config, parent_onnx=parent_onnx, data=data, task=self.config,
                                     student_onnx=student_onnx)

    def gate(self, metrics: dict[str, Any], recipe) -> dict[str, Any]:
        if self.config.instance:
            from edgeslim.components.tasks.segmentation.instance_eval import gate_instances

            return gate_instances(metrics, self.config.gate)
        from edgeslim.components.tasks.segmentation.evaluate import gate_segmentation

        return gate_segmentation(metrics, self.config.gate)

    def check_model(self, model, data) -> None:
        """The labels must be class maps (instance stacks) and the model's outputs logits of ``num_classes``
        channels (the decoded output and prototypes that fit ``num_classes``)."""
        if self.config.instance:
            from edgeslim.components.tasks.segmentation.instance_eval import check_instance_segmenter

            return check_instance_segmenter(model, data, self.config)
        from edgeslim.components.tasks.segmentation.evaluate import check_segmenter

        check_segmenter(model, data, self.config)

    def metadata(self) -> Any:
        return self.config.metadata()

    def figures(self, candidate_onnx, *, parent_onnx, data, student_onnx=None) -> dict[str, Any]:
        from edgeslim.components.tasks.segmentation.report import figures

        return figures(candidate_onnx, parent_onnx=parent_onnx, data=data, task=self.config,
                       student_onnx=student_onnx)

    def report_rows(self, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        from edgeslim.components.tasks.segmentation.report import rows

        return rows(report)

    def report_charts(self, report: dict[str, Any]) -> list:
        from edgeslim.components.tasks.segmentation.report import charts

        return charts(report)

    def engine_agreement(self, reference, candidate, labels) -> dict[str, float]:
        """The masks: the share of pixels where the engine's class is the Q/DQ ONNX's, and the mIoU of each
        (``yolo-seg``: the share of the ONNX's instances the engine also makes, and the mask mAP@0.5:0.95 of each)."""
        import numpy as np

        if self.config.instance:
            from edgeslim.components.tasks.segmentation.instance import decode_instances
            from edgeslim.components.tasks.segmentation.instance_eval import instance_metrics, mask_agreement, record

            labels = list(labels)
            hw = np.asarray(labels[0]).shape[-2:] if labels else None
            ref, cand = decode_instances(reference, self.config, hw), decode_instances(candidate, self.config, hw)
            found, total = mask_agreement(ref, cand, self.config.score_threshold)
            k, thr = self.config.num_classes, self.config.score_threshold
            return {"agreement": found / total if total else 1.0,
                    "onnx_metric": instance_metrics([record(d, y) for d, y in zip(ref, labels)], k, thr)["mask_map50_95"],
                    "engine_metric": instance_metrics([record(d, y) for d, y in zip(cand, labels)], k,
                                                      thr)["mask_map50_95"]}

        from edgeslim.components.tasks.segmentation.evaluate import confusion, segmentation_metrics
        from edgeslim.components.tasks.segmentation.runtime import argmax_masks, logits_output

        y = np.asarray(labels)
        ref, cand = (argmax_masks(logits_output(o, self.config), y.shape[1:]) for o in (reference, candidate))
        k, ign = self.config.num_classes, self.config.ignore_index
        return {"agreement": float((ref == cand).mean()),
                "onnx_metric": segmentation_metrics(confusion(ref, y, k, ign))["miou"],
                "engine_metric": segmentation_metrics(confusion(cand, y, k, ign))["miou"]}

    def logged_metrics(self, section: dict[str, Any]) -> dict[str, float]:
        seg = section.get("segmentation") or section.get("instance_segmentation") or {}
        return {k: seg[k] for k in ("pixel_accuracy", "worst_class_iou", "mask_map50", "box_map50_95", "mean_tp_score")
                if k in seg}
