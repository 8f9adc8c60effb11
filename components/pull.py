"""pull: a registered PyTorch model and its metadata, from the MLflow registry."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from edgeslim.components.common.errors import SourceError
from edgeslim.components.common.model_io import class_import_error, use_code
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.tracking import connect, model_id_of, resolve_version


def check_single_input(model, where: str) -> None:
    """Refuse, before anything runs, a model whose ``forward`` needs more than one input: every stage
    feeds one tensor per sample (the data provider's ``x``), and the ONNX and engines have one input.

    Raises:
        SourceError: one line naming the inputs and the fix.
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a scripted or C++ forward: the export check will say
        return
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(required) > 1:
        raise SourceError(
            f"{where}: forward() takes {len(required)} inputs ({', '.join(required)}); edgeslim compresses "
            "models with one input tensor: register a wrapper module whose forward(x) builds the others "
            "(or give them defaults)")


def pull(uri: str, *, tracking_uri: str | None = None, out_dir: str | Path) -> StageResult:
    """Download and load a registered PyTorch model.

    Args:
        uri: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        tracking_uri: the MLflow server; default ``$MLFLOW_TRACKING_URI``.
        out_dir: where the model's artifacts are downloaded.

    Returns:
        ``StageResult`` with the ``nn.Module`` and, in ``lineage``, the parent's
        name, version, run id, LoggedModel id, source and flavor.

    Raises:
        TrackingUnavailable: MLflow does not answer.
        SourceError: no such model/alias/version, not a PyTorch model, or a corrupt artifact.
    """
    import mlflow
    import torch

    t0 = time.perf_counter()
    client = connect(tracking_uri)
    mv = resolve_version(client, uri)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(out_dir / "parent"))
    except Exception as exc:  # artifact repos raise many types
        raise SourceError(f"source {uri}: cannot download its artifacts ({str(exc)[:160]})") from None
    mlmodel = Path(local) / "MLmodel"
    if not mlmodel.is_file():
        raise SourceError(f"source {uri}: version {mv.version} has no MLmodel file; log it with mlflow.pytorch.log_model")
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    if "pytorch" not in flavors:
        kinds = ", ".join(k for k in flavors if k != "python_function") or "unknown"
        raise SourceError(
            f"source {uri}: version {mv.version} is a {kinds} model, not a PyTorch module; "
            "edgeslim compresses models logged with mlflow.pytorch.log_model"
        )
    # Code logged with the model (code_paths) stays in <download>/parent/code; on sys.path (as
    # mlflow does) and remembered, so save_module ships it beside every model derived from this one.
    code = flavors["pytorch"].get("code")
    if code and (Path(local) / code).is_dir():
        use_code(Path(local) / code)
    try:
        model = mlflow.pytorch.load_model(local, map_location="cpu")
    except Exception as exc:  # a broken pickle surfaces as almost anything
        missing = class_import_error(f"source {uri}: version {mv.version}", exc)
        if missing is not None:
            raise missing from None
        raise SourceError(
            f"source {uri}: the model artifact of version {mv.version} is corrupt or unreadable "
            f"({type(exc).__name__}: {str(exc)[:120]}); re-log it with mlflow.pytorch.log_model"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"source {uri}: loads as {type(model).__name__}, not a torch.nn.Module")
    check_single_input(model, f"source {uri}")
    model.eval()
    lineage = {
        "uri": uri,
        "name": mv.name,
        "version": str(mv.version),
        "run_id": mv.run_id or "",
        "model_id": model_id_of(mv) or "",
        "source": mv.source or "",
        "serialization": flavors["pytorch"].get("serialization_format", "pickle"),
        "tracking_uri": client.tracking_uri,
    }
    return StageResult(model=model, lineage=lineage, seconds=time.perf_counter() - t0)
