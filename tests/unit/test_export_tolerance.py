"""The export check compares the ONNX with torch within atol + rtol x each output channel's largest |value|:
values in the hundreds (a detector's pixel boxes) may carry their float32 rounding, a real divergence is
still refused in one line. The divergence is made by a forward that computes something else while
torch.export traces it (``torch.compiler.is_exporting()``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import SourceError
from edgeslim.components.common.stage_configs import OnnxExportConfig
from edgeslim.components.export import export


class Drifts(nn.Module):
    """``[x * scale, x]`` per sample; while exported, ``offset`` is added to the first channel only."""

    def __init__(self, scale: float, offset: float):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x):
        big = x[:, :1] * self.scale
        if torch.compiler.is_exporting():
            big = big + self.offset
        return torch.cat([big, x[:, 1:]], 1)


def _data() -> Splits:
    x = np.random.default_rng(0).uniform(0.5, 1.0, (8, 2)).astype(np.float32)
    y = np.zeros(8, np.int64)
    return Splits(x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y)


def test_rounding_sized_differences_of_large_outputs_pass(tmp_path):
    # 0.02 on a channel whose values reach ~640 (what a detector's box coordinates are): within 1e-4 of it
    res = export(Drifts(640.0, 0.02), OnnxExportConfig(check_samples=8), data=_data(), out_path=tmp_path / "a.onnx")
    assert res.metrics["max_abs_diff"] == pytest.approx(0.02, abs=1e-3)


def test_a_real_divergence_is_refused_in_one_line(tmp_path):
    # the same 0.02 on a channel whose values stay below 1 is no rounding
    with pytest.raises(SourceError) as e:
        export(Drifts(1.0, 0.02), OnnxExportConfig(check_samples=8), data=_data(), out_path=tmp_path / "b.onnx")
    msg = str(e.value)
    assert "differs from torch by 0.02" in msg and "export.atol" in msg and "\n" not in msg
