"""The demo's embedded default: a digits teacher registered in a local MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

TEACHER = "digits-teacher"
ALIAS = "champion"
DEMO_RECIPE = Path(__file__).with_name("demo_recipe.yaml")
WIDTH = 64
EPOCHS = 15


def train_teacher(*, epochs: int = EPOCHS, progress: Callable[[str], None] | None = None):
    """Train the reference teacher (seeded) and return it as a ``TrainedModel`` to register."""
    import torch

    from edgeslim.components.reference.digits import DigitsCNN, top1, train_classifier
    from edgeslim.pipelines.reference_registry import TrainedModel
    from edgeslim.plugins.datasets import SklearnDigits

    data = SklearnDigits(seed=0).load()

    def tick(epoch, total, loss):
        if progress:
            progress(f"teacher: training epoch {epoch}/{total} (loss {loss:.3f})")

    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(width=WIDTH), data.x_train, data.y_train, epochs=epochs, seed=0,
                             progress=tick)
    return TrainedModel(model, params={"arch": "DigitsCNN", "width": WIDTH, "epochs": epochs, "seed": 0},
                        metrics={"val_top1": top1(model, data.x_val, data.y_val),
                                 "test_top1": top1(model, data.x_test, data.y_test)},
                        input_example=data.x_test[:2])


def ensure_teacher(client, *, epochs: int = EPOCHS, progress: Callable[[str], None] | None = None,
                   name: str = TEACHER, alias: str = ALIAS, experiment: str = "edgeslim-reference",
                   trained=None) -> str:
    """Register the reference teacher as ``name@alias`` unless it is there already.

    ``trained``: the result of :func:`train_teacher`, when the caller trained it already.

    Returns:
        The version that carries the alias.
    """
    from edgeslim.pipelines.reference_registry import ensure_registered

    return ensure_registered(client, name=name, alias=alias, experiment=experiment,
                             train=lambda: train_teacher(epochs=epochs, progress=progress),
                             label="teacher", run_name="digits-teacher", progress=progress, trained=trained)
