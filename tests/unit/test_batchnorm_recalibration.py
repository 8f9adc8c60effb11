"""A short fine-tune of a network whose BatchNorm momentum is small (torchvision's MobileNetV3 and
EfficientNet use 0.01) leaves eval mode on stale statistics; `fit` (asked by pruning) recalibrates exactly
those layers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeslim.components.transform.train import TrainConfig, fit


def _net(momentum: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _data(n: int = 64):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(n, 3, 8, 8)) * 3.0 + 5.0).astype(np.float32)  # far from BN's initial 0/1
    return x, rng.integers(0, 2, n)


def test_stale_statistics_become_the_training_inputs_average():
    x, y = _data()
    # 2 steps at momentum 0.01
    model = fit(_net(0.01), TrainConfig(epochs=1, lr=1e-3, batch_size=32, recalibrate_batchnorm=True), x=x, y=y)
    bn = model[1]
    with torch.no_grad():
        feats = model[0](torch.from_numpy(x))
    np.testing.assert_allclose(bn.running_mean.numpy(), feats.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.01 and not model.training  # put back as it was, in eval mode
    # without the request (QAT, distillation) the statistics stay as trained
    left = fit(_net(0.01), TrainConfig(epochs=1, lr=1e-3, batch_size=32), x=x, y=y)[1]
    assert float((left.running_mean - feats.mean(dim=(0, 2, 3))).abs().max()) > 1.0


def test_statistics_that_caught_up_are_left_exactly_as_trained():
    x, y = _data()
    torch.manual_seed(1)
    # 60 steps at momentum 0.1: 0.9^60 < 1%
    model = fit(_net(0.1), TrainConfig(epochs=30, lr=1e-3, batch_size=32, recalibrate_batchnorm=True), x=x, y=y)
    bn = model[1]
    # what plain training leaves: replay the same run without fit's end step
    from edgeslim.components.transform import train

    saved = train.STALE_BATCHNORM
    try:
        train.STALE_BATCHNORM = 2.0  # nothing counts as stale
        torch.manual_seed(1)
        plain = fit(_net(0.1), TrainConfig(epochs=30, lr=1e-3, batch_size=32), x=x, y=y)
    finally:
        train.STALE_BATCHNORM = saved
    assert torch.equal(bn.running_mean, plain[1].running_mean) and torch.equal(bn.running_var, plain[1].running_var)
