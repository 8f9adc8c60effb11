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
    """One check of a gate: the measured value, its threshold, and a sentence a person can act on.

    A drop judged with a confidence level (:func:`edgeslim.components.common.confidence.drop_check`) also
    holds its interval (``low``, ``high`` at ``level``) and its ``outcome``: ``within`` (passed), ``worse``
    (beyond the noise) or ``noise`` (the interval holds the threshold: not distinguishable at these images).
    """

    name: str
    value: float
    threshold: float
    passed: bool
    detail: str
    low: float | None = None
    high: float | None = None
    level: float | None = None
    outcome: str = ""


def verdict(checks: list[GateCheck], shown_when_passed: int | None = None) -> dict[str, Any]:
    """``{passed, outcome, checks, summary}`` of a gate: what passed, or by how much each failed check missed.

    ``outcome`` is ``passed``, ``refused`` (a check failed beyond the noise, or a check without an interval
    failed) or ``noise`` (every failed check's interval holds its threshold: these images cannot decide).
    """
    failed = [c for c in checks if not c.passed]
    if not failed:
        summary = "passed: " + "; ".join(c.detail for c in checks[:shown_when_passed])
    else:
        summary = "failed: " + "; ".join(
            f"{c.name} {c.detail}" if c.outcome == "noise" else
            f"{c.name} missed by {abs(c.value - c.threshold):.4g} ({c.detail})" for c in failed)
    outcome = "passed" if not failed else "noise" if all(c.outcome == "noise" for c in failed) else "refused"
    return {"passed": not failed, "outcome": outcome, "checks": [dataclasses.asdict(c) for c in checks],
            "summary": summary}
