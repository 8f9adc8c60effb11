"""What every stage returns."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StageResult:
    """A stage's output: the new model, what was measured, where it came from.

    Attributes:
        model: the new model (a torch module, or a path to an ONNX file).
        metrics: numbers for the report and for MLflow.
        lineage: what the model was derived from (parent URIs, data digests, configs).
        seconds: wall time the stage took.
    """

    model: Any
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    lineage: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
