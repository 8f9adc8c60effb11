"""The detection task: raw outputs decoded to boxes by the recipe's decoder (:mod:`.runtime`), judged
by mAP and score calibration (:mod:`.evaluate`), searched by its head-aware strategy (:mod:`.search`),
fine-tuned with the detection loss (:mod:`.train`, :mod:`.loss`, :mod:`.label_loss`) and its QAT twin
(:mod:`.qat`); gated by ``task.gate``.

This module and :mod:`.config` and :mod:`.runtime` import no torch at module level: the device
agent loads the task through the registry to read its runtime half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeslim.components.tasks.detection.config import DetectionTaskConfig
from edgeslim.components.tasks.detection.runtime import DetectionRuntime


class DetectionTask:
    kind = "detection"
    config_class = DetectionTaskConfig
    runtime = DetectionRuntime
    metric_label = "mAP@0.5"  # the task metric, as the report names it
    labels = "boxes: y_* object arrays, y[i] a (k, 5) [x1, y1, x2, y2, class] array in pixels"

    def __init__(self, config: DetectionTaskConfig):
        self.config = config

    @classmethod
    def recognises(cls, splits) -> bool:
        import numpy as np

        y = splits.y_train
        if not len(y) or np.asarray(y[:1]).dtype != object:
            return False
        first = np.asarray(y[0])
        return first.ndim == 2 and first.shape[1] == 5 or first.size == 0

    @classmethod
    def init_recipe(cls, *, source: str, output: Path, data: str, edge_name: str, splits,
                    load_model: Callable) -> str:
        from edgeslim.components.tasks.detection.init import init_recipe

        return init_recipe(source=source, output=output, data=data, edge_name=edge_name, splits=splits,
                           load_model=load_model)

    def transform(self, model, stages, *, data, progress: Callable | None = None):
        from edgeslim.components.tasks.detection.train import apply_detector_stages

        return apply_detector_stages(model, stages, data=data, task=self.config, progress=progress)

    def search_strategy(self, *, fp32_onnx, reference_onnx, recipe, model=None):
        from edgeslim.components.tasks.detection.search import DetectorStrategy

        # The detector's trials are judged against its own fp32 export (what the int8 step changes).
        return DetectorStrategy(fp32_onnx, self.config, model=model, export_config=recipe.export)

    def evaluate(self, candidate_onnx, config, *, parent_onnx, data, student_onnx=None):
        from edgeslim.components.tasks.detection.evaluate import evaluate_detection

        return evaluate_detection(candidate_onnx, config, parent_onnx=parent_onnx, data=data, task=self.config,
                                  student_onnx=student_onnx)

    def gate(self, metrics: dict[str, Any], recipe) -> dict[str, Any]:
        from edgeslim.components.tasks.detection.evaluate import gate_detection

        return gate_detection(metrics, self.config.gate)

    def check_model(self, model_path, data) -> None:
        """The model's outputs must be what the decoder expects (one line naming the shapes if not)."""
        from edgeslim.components.tasks.detection.evaluate import check_detector

        check_detector(model_path, data, self.config)

    def metadata(self) -> Any:
        return self.config.metadata()

    def figures(self, candidate_onnx, *, parent_onnx, data, student_onnx=None) -> dict[str, Any]:
        from edgeslim.components.tasks.detection.report import figures

        return figures(candidate_onnx, parent_onnx=parent_onnx, data=data, task=self.config,
                       student_onnx=student_onnx)

    def report_rows(self, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        from edgeslim.components.tasks.detection.report import rows

        return rows(report)

    def report_charts(self, report: dict[str, Any]) -> list:
        from edgeslim.components.tasks.detection.report import charts

        return charts(report)

    def engine_agreement(self, reference, candidate, labels) -> dict[str, float]:
        """Decoded detections: the share of the Q/DQ ONNX's boxes the engine also makes, and mAP@0.5 of each."""
        from edgeslim.components.tasks.detection.evaluate import detection_agreement, detection_metrics
        from edgeslim.components.tasks.detection.runtime import decode_outputs

        ref, cand = decode_outputs(reference, self.config), decode_outputs(candidate, self.config)
        gts, c = list(labels), self.config
        return {"agreement": detection_agreement(ref, cand, c.score_threshold),
                "onnx_metric": detection_metrics(ref, gts, c.num_classes, c.score_threshold)["map50"],
                "engine_metric": detection_metrics(cand, gts, c.num_classes, c.score_threshold)["map50"]}

    def logged_metrics(self, section: dict[str, Any]) -> dict[str, float]:
        det = section.get("detection") or {}
        return {k: det[k] for k in ("map50_95", "mean_tp_score", "recall", "precision") if k in det}
