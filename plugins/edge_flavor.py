"""The ``edgeslim_edge`` MLflow flavor: a Q/DQ ONNX plus TensorRT engines, that runs anywhere.

Like MLflow's own flavors: module-level ``save_model``, ``log_model``,
``load_model`` and ``_load_pyfunc``; heavy runtimes are imported inside
functions. The model directory holds::

    MLmodel
    model.onnx                      the int8 Q/DQ ONNX (portable: TensorRT 10/11 and ONNX Runtime)
    edge_meta.json                  facts about the model, and the status of each device class
    engines/<device_class>/         one per built engine
        model.engine  metadata.json  build.log  timing.cache  verification.json

``mlflow.pyfunc.load_model(uri).predict(batch)`` returns a dict with one
array per model output and ``backend``, the runtime that ran: the TensorRT
engine when TensorRT and a GPU that matches one of the engines are present,
else ONNX Runtime with the best provider it has, in the order TensorRT EP,
CUDA EP, CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from edgeslim.components.common.errors import DeviceError, EdgeslimError, SourceError

FLAVOR_NAME = "edgeslim_edge"
MODEL_FILE = "model.onnx"
META_FILE = "edge_meta.json"
ENGINES_DIR = "engines"
ENGINE_FILES = ("model.engine", "metadata.json", "build.log", "timing.cache", "verification.json")
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Set to "onnxruntime" to skip the TensorRT engines (e.g. to compare backends).
BACKEND_ENV = "EDGESLIM_EDGE_BACKEND"
log = logging.getLogger(__name__)


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
    from edgeslim.components.engine.builder import file_sha256, read_metadata

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

    import edgeslim
    from edgeslim.components.engine.builder import file_sha256

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
                         onnx_sha256=onnx_sha, edgeslim_version=edgeslim.__version__,
                         onnxruntime_version=onnxruntime.__version__)
        add_to_model(model, loader_module="edgeslim.plugins.edge_flavor", data=".", python_env=None)
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

    import edgeslim.plugins.edge_flavor as flavor

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


def previous_timing_caches(model_uri: str, device_class: str) -> dict[str, str]:
    """The timing cache of ``device_class`` in an earlier edge model, if it has one.

    A timing cache only speeds the build up, so a model that cannot be fetched
    is logged and skipped rather than failing the task.
    """
    import tempfile

    try:
        import mlflow

        dst = tempfile.mkdtemp(prefix="edgeslim-prev-")
        local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{ENGINES_DIR}/{device_class}",
                                                    dst_path=dst)
    except Exception as exc:  # any MLflow/network failure: build without the cache
        log.warning("no timing cache from %s (%s); building without one",
                                            model_uri, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}
    path = os.path.join(local, "timing.cache")
    return {device_class: path} if os.path.isfile(path) else {}


# --- choosing a backend ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """Which runtime the pyfunc uses, and why.

    Attributes:
        kind: ``tensorrt`` or ``onnxruntime``.
        device_class: the engine's class, for ``tensorrt``.
        providers: ONNX Runtime providers in the order tried, for ``onnxruntime``.
        reason: one line for logs and status pages.
    """

    kind: str
    device_class: Optional[str] = None
    providers: tuple[str, ...] = ()
    reason: str = ""


def _engine_fits(meta: Mapping[str, Any], tensorrt_version: str, local) -> Optional[str]:
    from edgeslim.components.engine.builder import check_engine_compatible

    try:
        check_engine_compatible(dict(meta), tensorrt_version, local)
    except DeviceError as exc:
        return str(exc)
    want, have = meta.get("jetpack"), local.jetpack
    if (want or have) and (str(want).split(".")[:2] != str(have).split(".")[:2]):
        return f"engine for {meta.get('device_class')} is for JetPack {want}; this device has {have}"
    return None


def choose_backend(engines: Mapping[str, Mapping[str, Any]], *, tensorrt_version: Optional[str], local,
                   available_providers: Iterable[str], force: Optional[str] = None) -> BackendChoice:
    """Pick the runtime: a matching TensorRT engine, else ONNX Runtime's best provider.

    Args:
        engines: device class -> engine metadata, for the engines the model ships.
        tensorrt_version: the installed TensorRT, or ``None``.
        local: this node's ``LocalDevice``, or ``None`` without a CUDA device.
        available_providers: ``onnxruntime.get_available_providers()``.
        force: ``"onnxruntime"`` to skip the engines.
    """
    why = "no CUDA device"
    if force != "onnxruntime" and local is not None:
        if not engines:
            why = "the model ships no TensorRT engine"
        elif not tensorrt_version:
            why = "TensorRT is not installed (pip install 'edgeslim[tensorrt]')"
        else:
            misfits = []
            for key in sorted(engines):
                misfit = _engine_fits(engines[key], tensorrt_version, local)
                if misfit is None:
                    return BackendChoice("tensorrt", device_class=key,
                                         reason=f"engine {key} matches {local.describe()}")
                misfits.append(misfit)
            why = f"no engine matches this GPU ({local.describe()})"
    elif force == "onnxruntime":
        why = f"{BACKEND_ENV}=onnxruntime"
    available = set(available_providers)
    gpu_eps = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    providers = tuple(p for p in ORT_PROVIDER_ORDER if p in available and (local is not None or p not in gpu_eps))
    return BackendChoice("onnxruntime", providers=providers or ("CPUExecutionProvider",),
                         reason=f"ONNX Runtime: {why}")


# --- the pyfunc -----------------------------------------------------------------------------


def _engine_metadata(root: Path, conf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    engines = conf.get("engines")
    if engines is None:  # a model saved before engines existed, or without MLmodel at hand
        engines = {p.name: f"{ENGINES_DIR}/{p.name}" for p in sorted((root / ENGINES_DIR).glob("*"))
                   if (p / "metadata.json").is_file()}
    for key, rel in engines.items():
        try:
            out[key] = json.loads((root / rel / "metadata.json").read_text())
        except (OSError, ValueError):
            log.warning("engine %s: metadata.json missing or unreadable; skipping it", key)
    return out


def _flavor_conf(root: Path) -> dict[str, Any]:
    try:
        from mlflow.models import Model

        return Model.load(str(root / "MLmodel")).flavors.get(FLAVOR_NAME, {})
    except Exception:  # no MLmodel (a bare model folder on a device): fall back to the folder layout
        return {}


class EdgeModel:
    """The loaded edge model; ``predict`` says which backend ran.

    Attributes:
        choice: the :class:`BackendChoice` made at load time.
        backend: ``tensorrt:<device_class>`` or ``onnxruntime:<provider>``.
    """

    def __init__(self, path: str | Path, *, local=None, tensorrt_version: Optional[str] = None):
        import onnxruntime as ort

        from edgeslim.components.engine import devices

        self.path = Path(path)
        meta_path = self.path / META_FILE
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.engines = _engine_metadata(self.path, _flavor_conf(self.path))
        local = local if local is not None else devices.detect_local_device()
        tensorrt_version = tensorrt_version or (devices.installed_tensorrt_version() if local else None)
        self.choice = choose_backend(self.engines, tensorrt_version=tensorrt_version, local=local,
                                     available_providers=ort.get_available_providers(),
                                     force=os.environ.get(BACKEND_ENV))
        self.runner = self.session = None
        if self.choice.kind == "tensorrt":
            try:
                from edgeslim.components.engine.builder import EngineRunner

                key = self.choice.device_class
                self.runner = EngineRunner(self.path / ENGINES_DIR / key, self.engines[key], local=local)
                self.backend = self.runner.backend
            except EdgeslimError as exc:
                log.warning("TensorRT engine unusable (%s); using ONNX Runtime", exc)
                self.choice = choose_backend({}, tensorrt_version=None, local=local,
                                             available_providers=ort.get_available_providers())
        if self.runner is None:
            from edgeslim.components.engine.stage import qdq_session

            # Q/DQ semantics (ORT_ENABLE_BASIC): see DESIGN.md, fused CPU int8 kernels can saturate.
            self.session = qdq_session(self.path / MODEL_FILE, providers=list(self.choice.providers))
            self.backend = f"onnxruntime:{self.session.get_providers()[0]}"
        log.info("edge model %s: backend %s (%s)", self.path, self.backend, self.choice.reason)

    def _feeds(self, data) -> dict[str, np.ndarray]:
        names = ([i.name for i in self.session.get_inputs()] if self.session is not None
                 else list(self.runner.inputs))
        if isinstance(data, Mapping):
            missing = [n for n in names if n not in data]
            if missing:
                raise SourceError(f"predict: input {missing[0]!r} is missing; the model's inputs: {', '.join(names)}")
            return {n: np.asarray(data[n], dtype=np.float32) for n in names}
        x = np.asarray(data.values if hasattr(data, "values") else data, dtype=np.float32)
        return {names[0]: x}

    def predict(self, data, params=None) -> dict[str, Any]:
        """Run a batch; returns one array per output name plus ``backend`` (and, for a detector whose
        metadata holds its detection ``task``, ``detections``)."""
        feeds = self._feeds(data)
        if self.runner is not None:
            result: dict[str, Any] = dict(self.runner.run(feeds))
        else:
            outs = self.session.run(None, feeds)
            result = {o.name: v for o, v in zip(self.session.get_outputs(), outs)}
        result["backend"] = self.backend
        task = self.meta.get("task")
        if isinstance(task, Mapping) and task.get("kind") == "detection":
            # A detector's pyfunc also returns decoded boxes: per image (M, 6) [x1, y1, x2, y2, score, class].
            from edgeslim.components.common.task_config import task_from_dict
            from edgeslim.components.common.decode import decode_outputs

            result["detections"] = decode_outputs({k: v for k, v in result.items() if k != "backend"},
                                                  task_from_dict(dict(task)))
        return result


def load_model(model_uri: str) -> EdgeModel:
    """Load an edge model from any MLflow URI."""
    from mlflow.artifacts import download_artifacts

    return EdgeModel(download_artifacts(model_uri))


def _load_pyfunc(path: str) -> EdgeModel:
    return EdgeModel(path)
