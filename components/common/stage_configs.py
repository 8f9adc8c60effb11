"""Settings of every stage method, one small dataclass each.

They live together, away from the stage code, so that a recipe can be
validated completely without importing torch or onnxruntime.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from .config import Config, StageConfig
from .errors import ConfigError

Calibrator = Literal["minmax", "entropy", "percentile", "mse"]


@dataclasses.dataclass(frozen=True)
class OnnxExportConfig(StageConfig):
    """Export to ONNX with a dynamic batch axis and a pinned opset.

    Attributes:
        opset: ONNX opset. 18 is the lowest the torch.export-based exporter
            writes, and TensorRT 10.x parses it.
        atol: largest absolute difference from torch allowed in the export check.
        check_samples: how many test samples the export check runs.
    """

    stage = "export"
    method = "onnx"
    opset: int = 18
    atol: float = 1e-3
    check_samples: int = 64

    def validate(self) -> None:
        if not 13 <= self.opset <= 23:
            raise ConfigError(
                f"export.opset: got {self.opset}; Q/DQ per-channel needs opset 13 or newer and "
                "onnx supports up to 23: use a value in 13..23 (default 18)"
            )
        if self.atol <= 0:
            raise ConfigError(f"export.atol: got {self.atol}; use a positive tolerance like 1e-3")
        if self.check_samples < 1:
            raise ConfigError(f"export.check_samples: got {self.check_samples}; use 1 or more")


@dataclasses.dataclass(frozen=True)
class PTQQuantizeConfig(StageConfig):
    """Post-training int8 quantization into a Q/DQ ONNX that TensorRT consumes.

    Symmetric (zero points all 0) with per-channel weight scales on the
    output-channel axis, as TensorRT's explicit quantization wants.

    Attributes:
        calibrator: how activation ranges are chosen from calibration data.
        num_samples: calibration samples, drawn from the train split only.
        percentile: for ``percentile``, the percentile of |x| kept unclipped.
        num_bins: histogram bins for ``entropy``/``mse``/``percentile`` (TensorRT uses 2048).
        float_layers: node names or fnmatch patterns kept in float.
        seed: which calibration samples are drawn.
    """

    stage = "quantize"
    method = "ptq"
    calibrator: Calibrator = "percentile"
    num_samples: int = 512
    percentile: float = 99.99
    num_bins: int = 2048
    float_layers: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(
                f"quantize.num_samples: got {self.num_samples}; use at least 1 (typical 256..1024)"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"quantize.percentile: got {self.percentile}; use a value in (50, 100], e.g. 99.99"
            )
        if self.num_bins < 128:
            raise ConfigError(
                f"quantize.num_bins: got {self.num_bins}; use at least 128 (TensorRT uses 2048)"
            )
