"""The classifier's numpy-only half: its outputs are plain logits, so a prediction adds nothing to
them and a device is healthy when its outputs match the golden ones within the rollout's tolerances."""

from __future__ import annotations

from typing import Any

from edgeslim.components.common.tasks import compare_outputs


class ClassificationRuntime:
    def __init__(self, config: Any) -> None:
        self.config = config

    def predict(self, outputs: dict[str, Any], geometries: list | None = None) -> dict[str, Any]:
        return {}

    def golden(self, outputs: dict[str, Any], rollout: Any) -> dict[str, Any]:
        return {}

    def compare(self, check: dict[str, Any], outputs: dict[str, Any]) -> tuple[str | None, float]:
        return compare_outputs(check, outputs)
