"""Connecting to MLflow with errors a user can act on."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request

from edgeslim.components.common.errors import SourceError, TrackingUnavailable

# The one parser of registry URIs: models:/NAME@ALIAS or models:/NAME/VERSION.
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")

DEFAULT_ENV = {
    # A down server should fail in seconds, not after minutes of retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``$MLFLOW_TRACKING_URI`` (Kubeflow's MLflow integration sets it)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise TrackingUnavailable(
            "no MLflow tracking URI; pass --tracking-uri, set tracking_uri in the recipe, "
            "or set MLFLOW_TRACKING_URI"
        )
    return uri


def connect(tracking_uri: str | None = None):
    """Point mlflow at the server, check it answers, return an ``MlflowClient``.

    Raises:
        TrackingUnavailable: the server does not answer; the message names the URI.
    """
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(
                f"MLflow tracking server at {uri} is not reachable ({reason}); "
                "start it or pass the right --tracking-uri"
            ) from None
    if mlflow.get_tracking_uri() != uri:
        # A cached experiment id belongs to the previous server.
        import mlflow.tracking.fluent as fluent

        fluent._active_experiment_id = None
    # The registry follows the tracking URI (no global registry URI: it would outlive a
    # later set_tracking_uri and send registrations to the wrong server).
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version), one of them None."""
    m = MODEL_URI.match(uri) if isinstance(uri, str) else None
    if not m:
        raise SourceError(f"model URI {uri!r}: use 'models:/NAME@ALIAS' (e.g. @edge-candidate) or "
                          "'models:/NAME/VERSION'")
    return m["name"], m["alias"], m["version"]


def model_id_of(mv) -> str | None:
    """The LoggedModel id of a version; the OSS SQL registry may leave ``model_id`` empty."""
    mid = getattr(mv, "model_id", None)
    if mid:
        return mid
    m = re.match(r"^models:/(m-[0-9a-f]+)", mv.source or "")
    return m.group(1) if m else None


def resolve_version(client, uri: str):
    """The ``ModelVersion`` a ``models:/`` URI names, or a ``SourceError`` that says what exists."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingUnavailable(f"MLflow at {client.tracking_uri}: {exc.message[:160]}") from None
        names = [m.name for m in client.search_registered_models(max_results=50)]
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "register it first, or fix the name"
        raise SourceError(f"source {uri}: no registered model named {name!r}; {hint}") from None
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        rm = client.get_registered_model(name)
        aliases = sorted((rm.aliases or {}).keys())
        if alias:
            have = f"its aliases: {', '.join(aliases)}" if aliases else "it has no aliases"
            raise SourceError(
                f"source {uri}: model {name!r} has no alias {alias!r} ({have}); "
                f"set one with MlflowClient().set_registered_model_alias"
            ) from None
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise SourceError(
            f"source {uri}: model {name!r} has no version {version} (versions: {versions or 'none'})"
        ) from None
