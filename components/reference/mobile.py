"""The second reference workload: an inverted-residual (MobileNetV2-style) net for digits.

Its graph has what makes structural pruning and quantization hard and what
``DigitsCNN`` lacks: depthwise convolutions, residual adds (whose channels must
be pruned together) and one concat (whose channels map back to two producers).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return layers


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a residual add
    when the block keeps its shape."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class DigitsMobileNet(nn.Module):
    """A small MobileNetV2-style classifier for 1x8x8 digits.

    Args:
        width: channel multiplier (1.0 is the reference size).
        num_classes: number of classes.
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10):
        super().__init__()

        def c(n: int) -> int:
            return max(4, int(round(n * width)))

        self.stem = nn.Sequential(*_conv_bn(1, c(16), 3))
        self.blocks = nn.Sequential(
            InvertedResidual(c(16), c(16), 1, expand=1),   # residual, depthwise without expansion
            InvertedResidual(c(16), c(24), 2, expand=4),   # 8x8 -> 4x4
            InvertedResidual(c(24), c(24), 1, expand=4),   # residual
        )
        # Two branches joined by a concat: the pruner must split the consumer's
        # input channels between two producers.
        self.branch_a = InvertedResidual(c(24), c(32), 1, expand=4)
        self.branch_b = nn.Sequential(*_conv_bn(c(24), c(16), 1))
        self.head = nn.Sequential(*_conv_bn(c(32) + c(16), c(96), 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(c(96), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.classifier(self.pool(self.head(x)))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.zeros(batch, 1, 8, 8),)


def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
    """Inputs shaped like the digits data (N, 1, 8, 8), for tracing and export."""
    return (torch.zeros(batch, 1, 8, 8),)
