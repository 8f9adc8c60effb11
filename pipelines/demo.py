"""The demo's embedded default: a digits teacher registered in a local MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

TEACHER = "digits-teacher"
ALIAS = "champion"
DEMO_RECIPE = Path(__file__).with_name("demo_recipe.yaml")


def ensure_teacher(client, *, epochs: int = 20, progress: Callable[[str], None] | None = None,
                   name: str = TEACHER, alias: str = ALIAS, experiment: str = "edgeslim-reference") -> str:
    """Register the reference teacher as ``name@alias`` unless it is there already.

    Returns:
        The version that carries the alias.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, alias)
        if progress:
            progress(f"teacher: reusing {name} version {mv.version} @{alias}")
        return str(mv.version)
    except MlflowException:
        pass
    from edgeslim.components.common.reference import DigitsCNN, top1, train_classifier
    from edgeslim.plugins.datasets import SklearnDigits

    data = SklearnDigits(seed=0).load()

    def tick(epoch, total, loss):
        if progress and (epoch == total or epoch % 5 == 0 or epoch == 1):
            progress(f"teacher: training epoch {epoch}/{total} (loss {loss:.3f})")

    import torch

    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(width=64), data.x_train, data.y_train, epochs=epochs, seed=0, progress=tick)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="digits-teacher"):
        mlflow.log_params({"arch": "DigitsCNN", "width": 64, "epochs": epochs, "seed": 0})
        mlflow.log_metrics({"val_top1": top1(model, data.x_val, data.y_val),
                            "test_top1": top1(model, data.x_test, data.y_test)})
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        input_example=data.x_test[:2], registered_model_name=name)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    if progress:
        progress(f"teacher: registered {name} version {version} @{alias}")
    return version
