"""The regressor's numpy-only half: a prediction adds its rounded values, and a release's health check
records the golden values, which a device's outputs must reproduce (beside the raw outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.components.common.tasks import compare_outputs


def values(outputs: dict[str, Any]) -> np.ndarray:
    """The predicted value of each sample: the model's one output, flattened to ``(N,)``."""
    out = np.asarray(next(iter(outputs.values())), dtype=np.float32)
    return out.reshape(len(out), -1)[:, 0]


class RegressionRuntime:
    def __init__(self, config: Any) -> None:
        self.config = config

    def predict(self, outputs: dict[str, Any], geometries: list | None = None) -> dict[str, Any]:
        return {"value": np.rint(values(outputs)).astype(np.int64)}

    def golden(self, outputs: dict[str, Any], rollout: Any) -> dict[str, Any]:
        return {"values": [int(v) for v in np.rint(values(outputs))]}

    def compare(self, check: dict[str, Any], outputs: dict[str, Any]) -> tuple[str | None, float]:
        reason, worst = compare_outputs(check, outputs)
        if reason:
            return f"regression: the predicted values moved ({reason})", worst
        got = [int(v) for v in np.rint(values(outputs))]
        if got != check.get("values", got):
            return f"regression: rounded values {got} differ from the golden {check['values']}", worst
        return None, worst
