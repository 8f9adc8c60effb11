"""The classification task: logits ``(N, classes)``, judged by top-1, top-1 agreement and SQNR
against the parent, distilled by KL divergence; gated by the recipe's top-level ``gate:``.

This module and :mod:`.config` and :mod:`.runtime` import no torch at module level: the device
agent loads the task through the registry to read its runtime half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeslim.components.tasks.classification.config import ClassificationTaskConfig
from edgeslim.components.tasks.classification.runtime import ClassificationRuntime


class ClassificationTask:
    kind = "classification"
    config_class = ClassificationTaskConfig
    runtime = ClassificationRuntime
    metric_label = "top-1"  # the task metric, as the report names it
    labels = "class indices: y_* integer arrays of shape (N,)"

    def __init__(self, config: ClassificationTaskConfig | None = None):
        self.config = config or ClassificationTaskConfig()

    @classmethod
    def recognises(cls, splits) -> bool:
        import numpy as np

        y = np.asarray(splits.y_train[:1]) if len(splits.y_train) else np.zeros(0, np.int64)
        return y.dtype != object and np.issubdtype(y.dtype, np.integer) and y.ndim == 1

    @classmethod
    def init_recipe(cls, *, source: str, output: Path, data: str, edge_name: str, splits,
                    load_model: Callable) -> str:
        from edgeslim.components.common.confidence import split_advice
        from edgeslim.components.recipe import AccuracyGateConfig
        from edgeslim.components.tasks.classification.init import INIT_TEMPLATE

        sizes = {"val": len(splits.y_val), "test": len(splits.y_test)} if splits is not None else {"val": None, "test": None}
        return INIT_TEMPLATE.format(source=source, output=output, data=data, edge_name=edge_name,
                                    confidence=split_advice(AccuracyGateConfig().max_metric_drop, "top-1 answers", **sizes))

    def transform(self, model, stages, *, data, progress: Callable | None = None):
        """The recipe's distill/prune stages, in order; the registered model is the teacher."""
        from edgeslim.components.transform.stages import apply_torch_stages

        return apply_torch_stages(model, stages, data=data, teacher=model, progress=progress)

    def search_strategy(self, *, fp32_onnx, reference_onnx, recipe, model=None):
        from edgeslim.components.tasks.classification.search import ClassifierStrategy

        return ClassifierStrategy(reference_onnx, recipe.gate, model=model, export_config=recipe.export)

    def evaluate(self, candidate_onnx, config, *, parent_onnx, data, student_onnx=None):
        from edgeslim.components.tasks.classification.evaluate import evaluate

        return evaluate(candidate_onnx, config, parent_onnx=parent_onnx, data=data, student_onnx=student_onnx)

    def gate(self, metrics: dict[str, Any], recipe) -> dict[str, Any]:
        from edgeslim.components.tasks.classification.evaluate import gate

        return gate(metrics, recipe.gate)

    def check_model(self, model_path, data) -> None:
        """Nothing beyond the export check: any model that takes the inputs gives logits."""

    def metadata(self) -> Any:
        return self.config.metadata()

    def figures(self, candidate_onnx, *, parent_onnx, data, student_onnx=None) -> dict[str, Any]:
        from edgeslim.components.tasks.classification.report import figures

        return figures(candidate_onnx, parent_onnx=parent_onnx, data=data, student_onnx=student_onnx)

    def report_rows(self, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        from edgeslim.components.tasks.classification.report import rows

        return rows(report)

    def report_charts(self, report: dict[str, Any]) -> list:
        return []

    def engine_agreement(self, reference, candidate, labels) -> dict[str, float]:
        """Top-1 of the first output (the logits): agreement, and accuracy against the labels."""
        import numpy as np

        first = next(iter(reference))
        ref_top, cand_top = reference[first].argmax(-1), candidate[first].argmax(-1)
        labels = np.asarray(labels)
        return {"agreement": float((ref_top == cand_top).mean()),
                "onnx_metric": float((ref_top == labels).mean() * 100.0),
                "engine_metric": float((cand_top == labels).mean() * 100.0)}

    def logged_metrics(self, section: dict[str, Any]) -> dict[str, float]:
        return {}
