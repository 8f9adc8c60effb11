"""The regression task's ``task:`` section: how close a prediction must be to count, and its own gate::

    task:
      kind: regression
      tolerance: 0.5                 # a prediction within 0.5 of the label counts as right
      gate: {max_mae_increase: 0.05, min_sqnr_db: 20.0}
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from edgeslim.components.common.config import Config
from edgeslim.components.common.tasks import TaskConfig


@dataclasses.dataclass(frozen=True)
class RegressionGateConfig(Config):
    """What an int8 regressor must keep.

    Attributes:
        max_mae_increase: largest allowed rise of the mean absolute error on the test split.
        min_sqnr_db: smallest output SQNR of the candidate against the fp32 model it was quantized from.
    """

    max_mae_increase: float = 0.05
    min_sqnr_db: float = 20.0

    def validate(self) -> None:
        self.require(self.max_mae_increase >= 0, "max_mae_increase", "use 0 or more", section="task.gate")


@dataclasses.dataclass(frozen=True)
class RegressionTaskConfig(TaskConfig):
    """A regressor: one float per sample; the metric is the share of predictions within ``tolerance``."""

    kind: Literal["regression"] = "regression"
    tolerance: float = 0.5
    gate: RegressionGateConfig = dataclasses.field(default_factory=RegressionGateConfig)
    quantize_methods = ("ptq", "auto")  # no QAT twin

    def validate(self) -> None:
        self.require(self.tolerance > 0, "tolerance", "use a positive distance, e.g. 0.5", section="task")
