"""The classification task's ``task:`` section (a recipe without one is a classification recipe).

A classifier is gated by the recipe's top-level ``gate:`` (top-1 drop, top-1 agreement, SQNR).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from edgeslim.components.common.tasks import TaskConfig


@dataclasses.dataclass(frozen=True)
class ClassificationTaskConfig(TaskConfig):
    """A classifier: outputs are logits (N, classes); evaluated by top-1 and gated by ``gate:``."""

    kind: Literal["classification"] = "classification"

    def metadata(self) -> Any:
        # A registered classifier records its kind alone (a classifier's section has nothing else).
        return self.kind
