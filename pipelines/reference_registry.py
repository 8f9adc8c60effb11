"""Register a demo's reference model once: reuse ``name@alias``, or train, log and register it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class TrainedModel:
    """What a trainer hands back to :func:`ensure_registered` to log.

    Attributes:
        model: the PyTorch module (logged with ``mlflow.pytorch``, pickled).
        params, metrics: logged on the run.
        input_example: logged with the model.
        note: appended to the "registered" progress line, e.g. ``"(test mAP@0.5 91.2)"``.
    """

    model: Any
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    input_example: Any = None
    note: str = ""


def ensure_registered(client, *, name: str, alias: str, experiment: str, train: Callable[[], TrainedModel],
                      label: str, run_name: str | None = None,
                      progress: Callable[[str], None] | None = None,
                      trained: TrainedModel | None = None) -> str:
    """Return the version of ``name@alias``; when there is none, ``train()`` and register the result.

    ``trained``: a model already trained by ``train`` (the demo trains while its fresh server
    boots); registered instead of training again when the alias is missing.

    The trained model is logged in a run of ``experiment`` (named ``run_name``, else ``name``)
    with its params and metrics, registered as ``name`` and given ``alias``. Progress lines
    start with ``label``: ``"LABEL: reusing NAME version V @ALIAS"`` or
    ``"LABEL: registered NAME version V @ALIAS [NOTE]"``; ``train`` reports its own.

    Returns:
        The version that carries the alias.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, alias)
        if progress:
            progress(f"{label}: reusing {name} version {mv.version} @{alias}")
        return str(mv.version)
    except MlflowException:
        pass
    if trained is None:
        trained = train()
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name or name):
        mlflow.log_params(trained.params)
        mlflow.log_metrics(trained.metrics)
        # The requirements are known (the model's class is edgeslim's): MLflow's inference of them
        # loads the model again in a subprocess, a few seconds of the demo's wall time.
        import torch

        from edgeslim.components.common.version import __version__

        info = mlflow.pytorch.log_model(trained.model, name="model", serialization_format="pickle",
                                        input_example=trained.input_example, registered_model_name=name,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                          f"edgeslim=={__version__}"])
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    if progress:
        note = f" {trained.note}" if trained.note else ""
        progress(f"{label}: registered {name} version {version} @{alias}{note}")
    return version
