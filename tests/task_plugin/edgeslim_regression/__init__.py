"""A regression task for edgeslim, from outside its repository: one float per sample (a digit's value),
judged by the share of predictions within ``task.tolerance`` of the label, gated by the rise of the mean
absolute error and the output SQNR (``task.gate``). Installed through one entry point::

    [project.entry-points."edgeslim.tasks"]
    regression = "edgeslim_regression:RegressionTask"

This module and :mod:`.config` and :mod:`.runtime` import no torch, mlflow or kfp at module level: the
device agent loads the task through edgeslim's task registry to read its runtime half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.result import StageResult

from edgeslim_regression.config import RegressionTaskConfig
from edgeslim_regression.runtime import RegressionRuntime


class RegressionTask:
    kind = "regression"
    config_class = RegressionTaskConfig
    runtime = RegressionRuntime
    metric_label = "within tolerance"
    labels = "values: y_* float arrays of shape (N,)"

    def __init__(self, config: RegressionTaskConfig | None = None):
        self.config = config or RegressionTaskConfig()

    @classmethod
    def recognises(cls, splits) -> bool:
        import numpy as np

        y = np.asarray(splits.y_train[:1])
        return y.ndim == 1 and np.issubdtype(y.dtype, np.floating)

    @classmethod
    def init_recipe(cls, *, source: str, output: Path, data: str, edge_name: str, splits,
                    load_model: Callable) -> str:
        from edgeslim_regression.init import INIT_TEMPLATE

        return INIT_TEMPLATE.format(source=source, output=output, data=data, edge_name=edge_name)

    def transform(self, model, stages, *, data, progress: Callable | None = None):
        if stages:
            raise ConfigError(f"stages: the regression task has no {stages[0].stage} stage; "
                              "remove distill/prune (export and quantize only)")
        return StageResult(model=model)

    def search_strategy(self, *, fp32_onnx, reference_onnx, recipe, model=None):
        from edgeslim_regression.search import RegressionStrategy

        return RegressionStrategy(fp32_onnx, self.config, model=model)

    def evaluate(self, candidate_onnx, config, *, parent_onnx, data, student_onnx=None):
        from edgeslim_regression.evaluate import evaluate

        return evaluate(candidate_onnx, config, parent_onnx=parent_onnx, data=data, task=self.config,
                        student_onnx=student_onnx)

    def gate(self, metrics: dict[str, Any], recipe) -> dict[str, Any]:
        from edgeslim_regression.evaluate import gate

        return gate(metrics, self.config.gate)

    def check_model(self, model, data) -> None:
        """The model must give one value per sample."""
        import numpy as np
        import torch

        from edgeslim.components.common.model_outputs import forward_tensors

        x = torch.from_numpy(np.ascontiguousarray(data.x_test[:2], dtype=np.float32))
        outs = forward_tensors(model.eval(), x)
        shapes = [list(o.shape) for o in outs]
        if len(outs) != 1 or int(np.prod(shapes[0][1:] or [1])) != 1:
            raise DataError(f"the model's outputs have shapes {shapes}; a regression model gives one "
                            "output of one value per sample, (N, 1) or (N,)")

    def metadata(self) -> Any:
        return self.config.metadata()

    def figures(self, candidate_onnx, *, parent_onnx, data, student_onnx=None) -> dict[str, Any]:
        from edgeslim_regression.report import figures

        return figures(candidate_onnx, parent_onnx=parent_onnx, data=data, student_onnx=student_onnx)

    def report_rows(self, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        from edgeslim_regression.report import rows

        return rows(report)

    def report_charts(self, report: dict[str, Any]) -> list:
        from edgeslim_regression.report import charts

        return charts(report)

    def engine_agreement(self, reference, candidate, labels) -> dict[str, float]:
        """Share of samples whose engine value is within the tolerance of the Q/DQ ONNX's; each one's metric."""
        import numpy as np

        from edgeslim_regression.evaluate import scores

        tol = self.config.tolerance
        ref, cand = (np.asarray(next(iter(o.values())), np.float64).reshape(-1) for o in (reference, candidate))
        y = np.asarray(labels, np.float64).reshape(-1)
        return {"agreement": float((np.abs(ref - cand) <= tol).mean()),
                "onnx_metric": scores(ref, y, tol)["within"], "engine_metric": scores(cand, y, tol)["within"]}

    def logged_metrics(self, section: dict[str, Any]) -> dict[str, float]:
        return dict(section.get("regression") or {})
