"""int8 never puts one scale on a tensor that concatenates pixel boxes with 0-1 scores (a decoded
detector's output): such a Concat stays float, and the scores keep their precision."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.onnx_runtime import make_session, run_batched
from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
from edgeslim.components.export import export
from edgeslim.components.quantize import ptq


class Decoded(nn.Module):
    """(N, 4 + 3, A): boxes in pixels of a 320 input beside sigmoid class scores, as Ultralytics decodes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.box = nn.Conv2d(8, 4, 1)
        self.cls = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        f = torch.relu(self.body(x))
        boxes = torch.sigmoid(self.box(f)).flatten(2) * 320.0
        scores = torch.sigmoid(self.cls(f)).flatten(2)
        return torch.cat((boxes, scores), 1)


def test_a_concat_of_boxes_and_scores_stays_float_and_the_scores_survive(tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32)
    y = np.zeros(24, np.int64)
    data = Splits(x, y, x, y, x, y)
    fp32 = export(Decoded().eval(), OnnxExportConfig(), data=data, out_path=tmp_path / "fp32.onnx").model
    want = run_batched(make_session(fp32), x)[:, 4:]

    res = ptq.quantize(fp32, PTQQuantizeConfig(calibrator="minmax", num_samples=24), data=data, out_dir=tmp_path / "q")
    concats = [n.name for n in onnx.load(str(res.model)).graph.node if n.op_type == "Concat"]
    assert res.metrics["float_mixed_range_concats"] == concats and len(concats) == 1
    scores = run_batched(make_session(res.model), x)[:, 4:]
    assert np.abs(scores - want).max() < 0.02  # each score on its own 0-1 scale

    # The same graph with one scale over the concat (the rule off): the scores lose their precision.
    monkeypatch.setattr(ptq, "MIXED_RANGE", float("inf"))
    one = ptq.quantize(fp32, PTQQuantizeConfig(calibrator="minmax", num_samples=24), data=data, out_dir=tmp_path / "one")
    assert one.metrics["float_mixed_range_concats"] == []
    assert np.abs(run_batched(make_session(one.model), x)[:, 4:] - want).max() > 0.5
