"""What every stage returns, and what a gate decides."""

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


@dataclasses.dataclass
class GateCheck:
    """One check of a gate: the measured value, its threshold, and a sentence a person can act on."""

    name: str
    value: float
    threshold: float
    passed: bool
    detail: str


def verdict(checks: list[GateCheck], shown_when_passed: int | None = None) -> dict[str, Any]:
    """``{passed, checks, summary}`` of a gate: what passed, or by how much each failed check missed."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        summary = "passed: " + "; ".join(c.detail for c in checks[:shown_when_passed])
    else:
        summary = "failed: " + "; ".join(
            f"{c.name} missed by {abs(c.value - c.threshold):.4g} ({c.detail})" for c in failed)
    return {"passed": not failed, "checks": [dataclasses.asdict(c) for c in checks], "summary": summary}
