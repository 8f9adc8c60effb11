"""Classification: top-1 accuracy, of output arrays or of a torch model."""

from __future__ import annotations

import numpy as np


def top1_percent(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose largest logit is the label, in percent."""
    return float((np.asarray(logits).argmax(axis=1) == labels).mean() * 100.0)


def top1(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a torch classifier on ``x`` in percent (eval mode, no gradients)."""
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean() * 100.0)
