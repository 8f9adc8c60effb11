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
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from edgeslim.components.common.errors import DeviceError, EdgeslimError, MissingDependencyError, SourceError
# The flavor's save side, re-exported: MLflow flavors offer save_model/log_model beside load_model.
from edgeslim.components.edge_model import (ENGINES_DIR, FLAVOR_NAME, META_FILE, MODEL_FILE,  # noqa: F401
                                            engine_status_tags, log_model, save_model, timing_caches_from)

ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Set to "onnxruntime" to skip the TensorRT engines (e.g. to compare backends).
BACKEND_ENV = "EDGESLIM_EDGE_BACKEND"
log = logging.getLogger(__name__)


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
            why = "TensorRT is not installed (pip install 'edgeslim[tensorrt10]' or '[tensorrt11]', per device class)"
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
        from edgeslim.components.common.tasks import runtime_for

        # The task's runtime half, read once: what a prediction adds to the raw outputs (a detector's boxes).
        self.task_runtime = runtime_for(self.meta.get("task"))
        self.preprocess = None  # how an image becomes the input, when the recipe declared data.preprocess
        if self.meta.get("preprocess"):
            from edgeslim.components.common.image_preprocess import ImagePreprocessConfig

            self.preprocess = ImagePreprocessConfig.from_dict(self.meta["preprocess"], prefix="preprocess")
        self.engines = _engine_metadata(self.path, _flavor_conf(self.path))
        local = local if local is not None else devices.detect_local_device()
        tensorrt_version = tensorrt_version or (devices.installed_tensorrt_version() if local else None)
        self.choice = choose_backend(self.engines, tensorrt_version=tensorrt_version, local=local,
                                     available_providers=ort.get_available_providers(),
                                     force=os.environ.get(BACKEND_ENV))
        self.runner = self.session = fallback = None
        if self.choice.kind == "tensorrt":
            try:
                from edgeslim.components.engine.runner import EngineRunner

                key = self.choice.device_class
                self.runner = EngineRunner(self.path / ENGINES_DIR / key, self.engines[key], local=local)
                self.backend = self.runner.backend
            except Exception as exc:  # an EdgeslimError from the runner, or anything TensorRT raised: serve anyway
                key = self.choice.device_class
                why = " ".join((str(exc) if isinstance(exc, EdgeslimError) else f"{type(exc).__name__}: {exc}").split())
                log.warning("TensorRT engine %s unusable (%s); using ONNX Runtime", key, why)
                if not isinstance(exc, MissingDependencyError):  # TensorRT is there but failed: say so
                    fallback = f" (fallback from tensorrt:{key})"
                choice = choose_backend({}, tensorrt_version=None, local=local,
                                        available_providers=ort.get_available_providers())
                self.choice = dataclasses.replace(choice, reason=f"ONNX Runtime: TensorRT engine {key} unusable: {why}")
        if self.runner is None:
            from edgeslim.components.common.onnx_runtime import make_session

            # Q/DQ semantics (ORT_ENABLE_BASIC): fused CPU int8 kernels can saturate (docs/design.md).
            self.session = make_session(self.path / MODEL_FILE, providers=list(self.choice.providers))
            self.backend = f"onnxruntime:{self.session.get_providers()[0]}" + (fallback or "")
        log.info("edge model %s: backend %s (%s)", self.path, self.backend, self.choice.reason)

    def _input_specs(self) -> list[tuple[str, tuple]]:
        """(name, shape) per model input, a dynamic dimension as -1; for a TensorRT engine the shape is
        left open, ``(-1,)``: its runner checks shapes against the engine's profile."""
        if self.session is not None:
            return [(i.name, tuple(d if isinstance(d, int) else -1 for d in i.shape))
                    for i in self.session.get_inputs()]
        return [(n, (-1,)) for n in self.runner.inputs]

    def _feeds(self, data) -> dict[str, np.ndarray]:
        """The model's input tensors, checked here: a model that takes raw images is logged without an
        input schema (MLflow's enforcement cannot describe both forms), so this is where a wrong
        dtype or shape is caught."""
        specs = self._input_specs()
        names = [n for n, _ in specs]
        if isinstance(data, Mapping):
            missing = [n for n in names if n not in data]
            if missing:
                raise SourceError(f"predict: input {missing[0]!r} is missing; the model's inputs: {', '.join(names)}"
                                  + self._images_hint())
            given = {n: data[n] for n in names}
        else:
            given = {names[0]: data.values if hasattr(data, "values") else data}
        return {n: self._tensor(n, given[n], shape) for n, shape in specs}

    def _images_hint(self) -> str:
        return ', or {"images": [JPEG/PNG bytes or (H, W, 3) uint8 arrays]}' if self.preprocess is not None else ""

    def _tensor(self, name: str, value, shape: tuple) -> np.ndarray:
        want = "(" + ", ".join("N" if i == 0 and d == -1 else "?" if d == -1 else str(d)
                               for i, d in enumerate(shape)) + ")"
        try:
            x = np.asarray(value)
        except (TypeError, ValueError):  # ragged nested lists
            x = None
        if x is None or x.dtype.kind not in "fiub":
            got = f"an array of {x.dtype}" if x is not None else f"a ragged {type(value).__name__}"
            raise SourceError(f"predict: input {name!r} got {got}; give numbers, float32 of shape {want}"
                              + self._images_hint())
        x = x.astype(np.float32)
        if len(shape) > 1 and (x.ndim != len(shape) or any(d > 0 and d != g for d, g in zip(shape, x.shape))):
            raise SourceError(f"predict: input {name!r} got shape {tuple(x.shape)}; the model takes {want}"
                              + self._images_hint())
        return x

    def _images(self, data):
        """The raw images in ``data`` (``{"images": [...]}`` or a DataFrame with an ``image`` column), or None.
        Text items are base64 (what JSON carries: MLflow serving, ``fleet predict``)."""
        if isinstance(data, Mapping) and "images" in data:
            return list(data["images"])
        columns = getattr(data, "columns", None)
        if columns is not None and "image" in list(columns):
            return list(data["image"])
        return None

    def predict(self, data, params=None) -> dict[str, Any]:
        """Run a batch; returns one array per output name plus ``backend`` (and, for a detector whose
        metadata holds its detection ``task``, ``detections``).

        ``data`` is the model's input tensors, or raw images (``{"images": [JPEG/PNG bytes or uint8
        HxWxC arrays]}``, or a DataFrame with an ``image`` column of bytes) that go through the
        preprocessing the recipe declared (``data.preprocess``); a detector's ``detections`` are then
        in each source image's pixels."""
        images = self._images(data)
        geometries = None
        if images is not None:
            if self.preprocess is None:
                raise SourceError("predict: raw images given, but this model records no data.preprocess; pass its "
                                  "input tensors, or compress it from a recipe that declares data.preprocess")
            from edgeslim.components.common.image_preprocess import images_to_inputs

            x, geometries = images_to_inputs(images, self.preprocess)
            data = x
        feeds = self._feeds(data)
        if self.runner is not None:
            result: dict[str, Any] = dict(self.runner.run(feeds))
        else:
            outs = self.session.run(None, feeds)
            result = {o.name: v for o, v in zip(self.session.get_outputs(), outs)}
        result["backend"] = self.backend
        outputs = {k: v for k, v in result.items() if k != "backend"}
        result.update(self.task_runtime.predict(outputs, geometries))
        return result


def load_model(model_uri: str) -> EdgeModel:
    """Load an edge model from any MLflow URI."""
    from mlflow.artifacts import download_artifacts

    return EdgeModel(download_artifacts(model_uri))


def _load_pyfunc(path: str) -> EdgeModel:
    return EdgeModel(path)
