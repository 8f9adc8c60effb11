"""The Task: what differs between kinds of model, chosen once from the recipe's ``task:`` section.

Code that differs by kind asks the task, not "is this a detector?": which torch stages train
it (and with which loss), the strategy by which the accuracy-aware search judges and ranks trials, how a candidate is
evaluated beside its parent, what the gate checks, what is checked before a run starts, and what
the registered edge model records about it. Built in: ``classification`` and ``detection``. Your
own: a class with the same methods, registered under the entry-point group ``edgeslim.tasks``
whose ``config_class`` parses the recipe's ``task:`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.task_config import (ClassificationTaskConfig, DetectionTaskConfig, task_entry_point,
                                                    task_metadata)


class ClassificationTask:
    """Logits ``(N, classes)``: top-1, agreement and SQNR against the parent, distillation by KL."""

    kind = "classification"
    config_class = ClassificationTaskConfig

    def __init__(self, config: ClassificationTaskConfig | None = None):
        self.config = config or ClassificationTaskConfig()

    def transform(self, model, stages, *, data: Splits, progress: Callable | None = None) -> StageResult:
        """The recipe's distill/prune stages, in order; the registered model is the teacher."""
        from edgeslim.components.transform.stages import apply_torch_stages

        return apply_torch_stages(model, stages, data=data, teacher=model, progress=progress)

    def search_strategy(self, *, fp32_onnx: str | Path, reference_onnx: str | Path, recipe, model=None):
        """How the accuracy-aware search judges and ranks this task's trials (:mod:`.quantize.search`)."""
        from edgeslim.components.quantize.search import ClassifierStrategy

        return ClassifierStrategy(reference_onnx, recipe.gate, model=model, export_config=recipe.export)

    def evaluate(self, candidate_onnx: str | Path, config, *, parent_onnx: str | Path, data: Splits,
                 student_onnx: str | Path | None = None) -> StageResult:
        from edgeslim.components.evaluate import evaluate

        return evaluate(candidate_onnx, config, parent_onnx=parent_onnx, data=data, student_onnx=student_onnx)

    def gate(self, metrics: dict[str, Any], recipe) -> dict[str, Any]:
        from edgeslim.components.evaluate import gate

        return gate(metrics, recipe.gate)

    def check_model(self, model_path: str | Path, data: Splits) -> None:
        """Nothing beyond the export check: any model that takes the inputs gives logits."""

    def metadata(self) -> Any:
        """What the registered edge model records (``edge_meta.json``'s ``task``)."""
        return task_metadata(self.config)


class DetectionTask(ClassificationTask):
    """Boxes and scores: decoded by the recipe's decoder, mAP and score calibration, the detection loss."""

    kind = "detection"
    config_class = DetectionTaskConfig

    def __init__(self, config: DetectionTaskConfig):
        self.config = config

    def transform(self, model, stages, *, data: Splits, progress: Callable | None = None) -> StageResult:
        from edgeslim.components.transform.detect import apply_detector_stages

        return apply_detector_stages(model, stages, data=data, task=self.config, progress=progress)

    def search_strategy(self, *, fp32_onnx: str | Path, reference_onnx: str | Path, recipe, model=None):
        from edgeslim.components.quantize.detect_search import DetectorStrategy

        # The detector's trials are judged against its own fp32 export (what the int8 step changes).
        return DetectorStrategy(fp32_onnx, self.config, model=model, export_config=recipe.export)

    def evaluate(self, candidate_onnx: str | Path, config, *, parent_onnx: str | Path, data: Splits,
                 student_onnx: str | Path | None = None) -> StageResult:
        from edgeslim.components.tasks.detection import evaluate_detection

        return evaluate_detection(candidate_onnx, config, parent_onnx=parent_onnx, data=data, task=self.config)

    def gate(self, metrics: dict[str, Any], recipe) -> dict[str, Any]:
        from edgeslim.components.tasks.detection import gate_detection

        return gate_detection(metrics, self.config.gate)

    def check_model(self, model_path: str | Path, data: Splits) -> None:
        """The model's outputs must be what the decoder expects (one line naming the shapes if not)."""
        from edgeslim.components.tasks.detection import check_detector

        check_detector(model_path, data, self.config)


_TASKS: dict[str, type] = {"classification": ClassificationTask, "detection": DetectionTask}


def task_for(config) -> ClassificationTask:
    """The Task for a parsed ``task:`` section (``recipe.task``): a built-in, or your ``edgeslim.tasks`` entry point."""
    cls = _TASKS.get(config.kind) or task_entry_point(config.kind)
    if cls is None:
        raise ConfigError(f"task.kind: no task is registered as {config.kind!r} in the entry-point group "
                          "'edgeslim.tasks'")
    return cls(config)
