"""Reference models built offline from scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.accuracy import top1  # noqa: F401  (the demo's and tests' name for it)


class DigitsCNN(nn.Module):
    """The demo teacher: a plain VGG-style CNN for 1x8x8 digits.

    Wide on purpose, like the over-sized models teams register first: there is
    room to distil, prune and quantize.
    """

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, w), *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 2 * 2, 4 * w), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(4 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.zeros(batch, 1, 8, 8),)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 30,
                     lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                     progress=None) -> nn.Module:
    """Train a classifier with AdamW and a one-cycle schedule; repeatable for a seed.

    The one training loop is :func:`edgeslim.components.transform.train.fit` (here without a teacher).
    """
    from edgeslim.components.transform.train import TrainConfig, fit, random_shift

    return fit(model, TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adamw", augment=random_shift,
                                  schedule="onecycle", weight_decay=1e-4, seed=seed),
               x=x, y=y, progress=progress)

