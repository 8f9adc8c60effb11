"""Top-1 accuracy, of output arrays or of a torch classifier: what the classifier stages report as they train."""

from __future__ import annotations

import numpy as np


def top1_percent(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose largest logit is the label, in percent."""
    return float((np.asarray(logits).argmax(axis=1) == labels).mean() * 100.0)


def top1(model, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    """Top-1 accuracy of a torch classifier on ``x`` in percent (eval mode, no gradients), ``batch``
    samples at a time (``x`` may be a lazy split: only one batch is in memory)."""
    import torch

    model.eval()
    pred = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            pred.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).argmax(1).numpy())
    return float((np.concatenate(pred) == np.asarray(y)).mean() * 100.0) if pred else float("nan")
