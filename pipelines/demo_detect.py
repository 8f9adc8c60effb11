"""The detection demo's embedded default: a YOLO-style digits detector registered in a local MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

DETECTOR = "digits-detector"
ALIAS = "champion"
DETECT_RECIPE = Path(__file__).with_name("detect_recipe.yaml")
EPOCHS = 20


def train_reference_detector(*, epochs: int = EPOCHS, width: int = 16, seed: int = 0,
                             progress: Callable[[str], None] | None = None, threads: int | None = 1,
                             n_val: int = 300, n_test: int = 400):
    """Train the reference :class:`DigitsDetector` on the ``digits-detect`` train split.

    Args:
        threads: torch intra-op threads while training (None: torch's default). One thread by
            default: on a busy 2-core laptop OpenMP oversubscription made epochs 30x slower
            (8 s -> 300 s per epoch, measured); the small convolutions gain little from more.

        n_val, n_test: validation and test canvases (the train split does not change with them).

    Returns:
        ``(model, data)``.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)

    from edgeslim.components.reference.detector import DigitsDetector, make_detection_splits, train_detector

    data = make_detection_splits(seed=seed, n_val=n_val, n_test=n_test)

    def tick(epoch, total, loss):
        if progress:
            progress(f"detector: training epoch {epoch}/{total} (loss {loss:.3f})")

    torch.manual_seed(seed)
    model = train_detector(DigitsDetector(width=width), data.x_train, data.y_train, epochs=epochs, seed=seed,
                           progress=tick)
    return model, data


def train_registrable_detector(*, epochs: int = EPOCHS, progress: Callable[[str], None] | None = None):
    """Train the reference detector and score it on its test split: a ``TrainedModel`` to register."""
    from edgeslim.components.recipe import load_recipe
    from edgeslim.components.tasks.detection.evaluate import detection_metrics, torch_detections
    from edgeslim.pipelines.reference_registry import TrainedModel

    model, data = train_reference_detector(epochs=epochs, progress=progress)
    task = load_recipe(DETECT_RECIPE).task
    m = detection_metrics(torch_detections(model, data.x_test, task), list(data.y_test), task.num_classes,
                          task.score_threshold)
    return TrainedModel(model, params={"arch": "DigitsDetector", "width": 16, "epochs": epochs, "seed": 0},
                        metrics={"test_map50": m["map50"], "test_map50_95": m["map50_95"],
                                 "test_mean_tp_score": m["mean_tp_score"], "test_recall": m["recall"]},
                        input_example=data.x_test[:2], note=f"(test mAP@0.5 {m['map50']:.1f})")


def ensure_detector(client, *, epochs: int = EPOCHS, progress: Callable[[str], None] | None = None,
                    name: str = DETECTOR, alias: str = ALIAS, experiment: str = "edgeslim-reference",
                    trained=None) -> str:
    """Register the reference detector as ``name@alias`` unless it is there already.

    ``trained``: the result of :func:`train_registrable_detector`, when the caller trained it already.

    Returns:
        The version that carries the alias.
    """
    from edgeslim.pipelines.reference_registry import ensure_registered

    return ensure_registered(client, name=name, alias=alias, experiment=experiment,
                             train=lambda: train_registrable_detector(epochs=epochs, progress=progress),
                             label="detector", run_name="digits-detector", progress=progress, trained=trained)
