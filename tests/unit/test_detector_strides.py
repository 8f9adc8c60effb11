"""Fine-tuning a detector takes its strides from the recipe or the model, not from the reference detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.tasks import task_from_dict
from edgeslim.components.tasks.detection.loss import build_targets, level_ranges, level_strides
from edgeslim.components.tasks.detection.train import train_detector


class TwoLevel(nn.Module):
    """(box, cls) pairs at strides 8 and 16: not the reference detector's 4/8/16."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.s8 = nn.Sequential(nn.Conv2d(1, 8, 8, stride=8), nn.SiLU())
        self.s16 = nn.Sequential(nn.Conv2d(8, 8, 2, stride=2), nn.SiLU())
        self.box = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)])
        self.cls = nn.ModuleList([nn.Conv2d(8, num_classes, 1), nn.Conv2d(8, num_classes, 1)])

    def forward(self, x):
        f8 = self.s8(x)
        f16 = self.s16(f8)
        return (self.box[0](f8).relu(), self.cls[0](f8).sigmoid(), self.box[1](f16).relu(), self.cls[1](f16).sigmoid())


def _data(n=16, h=64, w=96, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, h, w), np.float32)
    labels = []
    for i in range(n):
        side = int(rng.integers(10, 40))
        x1, y1 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        x[i, 0, y1:y1 + side, x1:x1 + side] = 1.0
        labels.append(np.array([[x1, y1, x1 + side, y1 + side, side >= 25]], np.float32))
    return x, labels


def test_the_level_ranges_of_the_reference_strides_are_the_reference_ranges():
    assert level_ranges((4, 8, 16)) == [(0.0, 16.0), (11.0, 32.0), (22.0, 1e9)]
    assert level_ranges((8, 16, 32)) == [(0.0, 32.0), (22.0, 64.0), (44.0, 1e9)]


def test_targets_follow_the_models_strides_on_a_non_square_input():
    box = np.array([[8, 8, 28, 28, 1]], np.float32)  # 20 px: the stride-8 level's range
    t8, t16 = build_targets([box], (64, 96), 2, (8, 16))
    assert t8["cls"].shape == (1, 2, 8, 12) and t16["cls"].shape == (1, 2, 4, 6)
    assert t8["pos"].any() and not t16["pos"].any()
    gy, gx = np.nonzero(t8["pos"][0])
    assert ((gx + 0.5) * 8 > 8).all() and ((gx + 0.5) * 8 < 28).all()


def test_strides_come_from_the_recipe_then_the_model_then_the_map_sizes():
    model = TwoLevel().eval()
    x = torch.zeros(1, 1, 64, 96)
    outs = model(x)
    assert level_strides(model, x, outs) == [8, 16]                # input size over map size
    model.stride = torch.tensor([8.0, 16.0])                        # as Ultralytics models carry it
    assert level_strides(model, x, outs) == [8, 16]
    task = task_from_dict({"kind": "detection", "num_classes": 2, "decoder": {"heads": [
        {"box": "output_0", "cls": "output_1", "stride": 8}, {"box": "output_2", "cls": "output_3", "stride": 16}]}})
    assert level_strides(model, x, outs, task) == [8, 16]
    wrong = task_from_dict({"kind": "detection", "num_classes": 2, "decoder": {"heads": [
        {"box": "output_0", "cls": "output_1", "stride": 4}, {"box": "output_2", "cls": "output_3", "stride": 8}]}})
    with pytest.raises(ConfigError, match=r"task.decoder.heads gives strides \[4, 8\].*strides \[8, 16\]"):
        level_strides(model, x, outs, wrong)


def test_a_detector_with_its_own_strides_fine_tunes():
    torch.manual_seed(0)
    x, labels = _data()
    losses = []
    train_detector(TwoLevel(), x, labels, epochs=4, lr=1e-2, batch_size=8,
                   progress=lambda e, n, loss: losses.append(loss))
    assert len(losses) == 4 and np.isfinite(losses).all() and losses[-1] < losses[0]


class DecodedOnly(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 6, 84), {"feats": [x]}


def test_a_model_without_map_pairs_is_refused_in_one_line():
    x, labels = _data(n=2)
    with pytest.raises(ConfigError, match=r"\(box, cls\) map pairs.*returns a tuple \(a tensor \[1, 6, 84\], a dict"):
        train_detector(DecodedOnly(), x, labels, epochs=1)
