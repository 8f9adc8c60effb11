"""The edge model package: what the ``edgeslim_edge`` MLflow flavor saves and logs.

The model directory holds::

    MLmodel
    model.onnx                      the int8 Q/DQ ONNX (portable: TensorRT 10/11 and ONNX Runtime)
    edge_meta.json                  facts about the model, and the status of each device class
    engines/<device_class>/         one per built engine
        model.engine  metadata.json  build.log  timing.cache  verification.json

Saving is a stage's business (``register`` logs the gated candidate); loading and running it
is the flavor's (:mod:`edgeslim.plugins.edge_flavor`, named in the MLmodel file as the loader).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from edgeslim.components.common.errors import DeviceError, SourceError
from edgeslim.components.common.hashing import file_sha256

FLAVOR_NAME = "edgeslim_edge"
LOADER_MODULE = "edgeslim.plugins.edge_flavor"
MODEL_FILE = "model.onnx"
META_FILE = "edge_meta.json"
ENGINES_DIR = "engines"
ENGINE_FILES = ("model.engine", "metadata.json", "build.log", "timing.cache", "verification.json")


# --- engines in, engines out ---------------------------------------------------------------


@dataclasses.dataclass
class _EngineIn:
    folder: Optional[Path]   # holds model.engine + metadata.json; None when not built
    status: str


def _engine_source(item: Any) -> Path:
    """The folder of an engine given as a folder, a ``model.engine`` path or a ``BuiltEngine``."""
    path = Path(getattr(item, "engine_path", item))
    return path if path.is_dir() else path.parent


def _collect_engines(engines: Any) -> dict[str, _EngineIn]:
    """Normalize the ``engines=`` argument of :func:`save_model`."""
    from edgeslim.components.engine.stage import STATUS_BUILT, read_summary

    if engines is None:
        return {}
    if isinstance(engines, (str, os.PathLike)):
        root = Path(engines)
        if not root.is_dir():
            raise SourceError(f"engines {root}: no such folder; pass the out_dir of build_engines")
        summary = read_summary(root)["engines"]
        out = {}
        for key, entry in summary.items():
            built = entry.get("built") and (root / key / "model.engine").is_file()
            out[key] = _EngineIn(root / key if built else None, entry.get("status", "unknown"))
        return out
    if isinstance(engines, Mapping):
        items: Iterable = engines.items()
    else:
        items = ((getattr(e, "metadata", {}).get("device_class"), e) for e in engines)
    out = {}
    for key, item in items:
        if not key:
            raise SourceError("engines: an engine without a device class; pass {device_class: engine folder}")
        if isinstance(item, str) and not Path(item).exists():
            out[key] = _EngineIn(None, item)   # a status line, e.g. "not built: no CUDA device; ..."
        else:
            out[key] = _EngineIn(_engine_source(item), STATUS_BUILT)
    return out


def _copy_engine(src: Path, dst: Path, device_class: str, onnx_sha256: str) -> dict[str, Any]:
    from edgeslim.components.engine.builder import read_metadata

    meta = read_metadata(src)
    if meta.get("device_class") != device_class:
        raise DeviceError(f"engine in {src} is for {meta.get('device_class')!r}, not {device_class!r}; "
                          "pass each engine under its own device class")
    if file_sha256(src / "model.engine") != meta.get("sha256"):
        raise DeviceError(f"engine in {src}: its sha256 differs from its metadata.json; rebuild it")
    if meta.get("onnx_sha256") != onnx_sha256:
        raise DeviceError(f"engine for {device_class} in {src} was built from another ONNX "
                          f"(sha256 {str(meta.get('onnx_sha256'))[:12]}...); rebuild it from this Q/DQ ONNX")
    dst.mkdir(parents=True)
    for name in ENGINE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return meta


def engine_status_tags(statuses: Mapping[str, str]) -> dict[str, str]:
    """MLflow tags that say, per device class, whether an engine ships (``edgeslim.engine.<class>``)."""
    return {f"edgeslim.engine.{k}": v[:5000] for k, v in statuses.items()}


def save_model(path: str | Path, onnx_path: str | Path, *, metadata: dict[str, Any] | None = None,
               engines: Any = None, mlflow_model=None, signature=None, input_example=None,
               edge_metadata: dict[str, Any] | None = None) -> Path:
    """Write the edge model directory at ``path``.

    Args:
        path: a new directory.
        onnx_path: the int8 Q/DQ ONNX.
        metadata: free-form facts stored beside the model (recipe hash, metrics, ...).
        engines: TensorRT engines to ship: the ``out_dir`` of
            ``build_engines`` (statuses included), or a mapping of device class
            to an engine folder / ``BuiltEngine`` / a status line for a class
            that was not built, or a list of ``BuiltEngine``.
        edge_metadata: what :func:`log_model` passes as ``metadata`` (``Model.log``
            keeps its own ``metadata`` argument for the MLmodel file).

    Raises:
        DeviceError: an engine is for another class, was built from another
            ONNX, or does not match its metadata; nothing is left at ``path``.
    """
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    from edgeslim.components.common.version import __version__

    path = Path(path)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise SourceError(f"ONNX file {onnx_path}: no such file; pass the Q/DQ ONNX")
    collected = _collect_engines(engines)
    path.mkdir(parents=True, exist_ok=False)
    try:
        shutil.copyfile(onnx_path, path / MODEL_FILE)
        onnx_sha = file_sha256(path / MODEL_FILE)
        engine_dirs, statuses = {}, {}
        for key, item in sorted(collected.items()):
            statuses[key] = item.status
            if item.folder is not None:
                _copy_engine(item.folder, path / ENGINES_DIR / key, key, onnx_sha)
                engine_dirs[key] = f"{ENGINES_DIR}/{key}"
        meta = {**(metadata or {}), **(edge_metadata or {}), "onnx_sha256": onnx_sha, "engines": statuses}
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        model = mlflow_model or Model()
        if signature is not None:
            model.signature = signature
        if input_example is not None:
            from mlflow.models.utils import _save_example

            _save_example(model, input_example, str(path))
        import onnxruntime

        model.add_flavor(FLAVOR_NAME, model_file=MODEL_FILE, meta_file=META_FILE, engines=engine_dirs,
                         onnx_sha256=onnx_sha, edgeslim_version=__version__,
                         onnxruntime_version=onnxruntime.__version__)
        add_to_model(model, loader_module=LOADER_MODULE, data=".", python_env=None)
        model.save(str(path / "MLmodel"))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # nothing half-written
        raise
    return path


def log_model(onnx_path: str | Path, name: str = "model", *, metadata: dict[str, Any] | None = None,
              engines: Any = None, signature=None, input_example=None, params: dict | None = None,
              tags: dict | None = None):
    """Log the edge model to the active run; returns MLflow's ``ModelInfo``.

    The logged model gets a tag per device class (``edgeslim.engine.<class>``)
    saying whether an engine ships or why not.
    """
    from mlflow.models import Model

    # Model.log calls this module's save_model; the MLmodel names the flavor's loader module.
    flavor = sys.modules[__name__]
    statuses = {k: v.status for k, v in _collect_engines(engines).items()}
    all_tags = {**engine_status_tags(statuses), **(tags or {})}
    # ``metadata`` goes both to edge_meta.json (what devices read) and, as before, to MLmodel.
    return Model.log(artifact_path=None, name=name, flavor=flavor, onnx_path=onnx_path, metadata=metadata,
                     edge_metadata=metadata, engines=engines, signature=signature, input_example=input_example, params=params,
                     tags=all_tags or None)


def timing_caches_from(model_dir: str | Path) -> dict[str, Path]:
    """Per device class, the timing cache a saved edge model carries.

    The next build for the same class starts from it (``build_engines(...,
    timing_caches=...)``); pass a previous version's downloaded folder.
    """
    root = Path(model_dir) / ENGINES_DIR
    return {p.parent.name: p for p in sorted(root.glob("*/timing.cache"))}
