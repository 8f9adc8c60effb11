"""engine: Q/DQ ONNX -> TensorRT engine for one device class, and the metadata stored beside it.

Imports no torch, mlflow or kfp: the device agent on a Jetson builds engines
with it on first install. ``tensorrt`` and ``onnx`` are imported inside the
functions that need them, so that everything else here (device matching,
profiles, metadata, cache keys, refusals) works where TensorRT is missing.
The runner that executes an engine is ``runner``; the TensorRT calls both make
go through ``tensorrt_calls``.

The TensorRT API generation is picked at run time:

- TensorRT 8.x/10.x (JetPack 5/6): a weakly typed network over the Q/DQ
  graph with the ``INT8`` and ``FP16`` builder flags (FP16 lets the layers
  outside Q/DQ pairs run in half precision); ``engines.strongly_typed: true``
  asks for a strongly typed one on 10.x.
- TensorRT 11.x: weak typing is gone (no precision flags); the network is
  strongly typed, so int8 comes from the Q/DQ nodes alone.

Settings that only some TensorRT versions have (``devices.TENSORRT_FEATURES``)
are refused, in one line, before TensorRT is asked. Whatever TensorRT raises or
logs on the way (a builder it cannot create, a parser error, a failed build)
becomes a ``DeviceError``/``SourceError`` that carries the last error lines of
its log, so callers fall back to ONNX Runtime.
tests/unit/test_trt_conformance.py checks every TensorRT name used here
against the real Python bindings of each generation.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.hashing import file_sha256  # noqa: F401  (re-exported)
from edgeslim.components.common.errors import ConfigError, DeviceError, MissingDependencyError, SourceError
from edgeslim.components.engine.onnx_support import graph_ops, parser_problem
from edgeslim.components.engine.devices import (TENSORRT_FEATURES, DeviceClass, LocalDevice, detect_local_device,
                                                get_device_class, match_device_class, version_tuple)
from edgeslim.components.engine.tensorrt_calls import (TENSORRT_FAILURES, Steps, collecting_logger, enum_member,
                                                       import_tensorrt, log_problems)

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
META_FILE = "metadata.json"
LOG_FILE = "build.log"
TIMING_CACHE_FILE = "timing.cache"
METADATA_FORMAT = "edgeslim-trt-engine"
NOT_BUILT_NO_CUDA = "not built: no CUDA device; devices build it from the Q/DQ ONNX on first install"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An ONNX graph input or output. Dynamic dimensions are ``-1``."""

    name: str
    shape: list[int]
    dtype: str

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if d < 0]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class OnnxInfo:
    """What the builder needs to know about an ONNX file before TensorRT sees it."""

    path: Path
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    qdq_nodes: int
    opset: int = 0
    ops: frozenset = frozenset()


def _specs(values) -> list[TensorSpec]:
    import onnx
    from onnx import helper

    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        except (KeyError, TypeError):
            dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
        out.append(TensorSpec(v.name, shape, dtype))
    return out


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Inputs, outputs, Q/DQ node count and sha256 of an ONNX file.

    Raises:
        SourceError: the file is missing or not an ONNX model.
    """
    try:
        import onnx
    except ImportError:  # the TensorRT-only agent without it: engines come prebuilt
        raise MissingDependencyError("onnx", None, "reading the Q/DQ ONNX before an engine build") from None
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"ONNX file {path}: no such file; pass the Q/DQ ONNX the quantize stage wrote")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise SourceError(f"ONNX file {path}: cannot be read as ONNX ({type(exc).__name__}); "
                          "pass the .onnx file the quantize stage wrote") from None
    init = {i.name for i in model.graph.initializer}
    inputs = _specs(i for i in model.graph.input if i.name not in init)
    if not inputs:
        raise SourceError(f"ONNX file {path}: the graph has no inputs; export the model again")
    qdq = sum(1 for n in model.graph.node if n.op_type in QDQ_OPS)
    opset, ops = graph_ops(path)
    return OnnxInfo(path, file_sha256(path), inputs, _specs(model.graph.output), qdq, opset, frozenset(ops))


def require_qdq(info: OnnxInfo, precision: str) -> None:
    """Refuse an int8 build of an ONNX without Q/DQ nodes."""
    if precision == "int8" and info.qdq_nodes == 0:
        raise SourceError(
            f"{info.path.name} has no QuantizeLinear/DequantizeLinear nodes, but engines.precision is "
            "int8: TensorRT takes int8 only from Q/DQ nodes (explicit quantization); pass the Q/DQ "
            "ONNX from the quantize stage, or set engines.precision to fp16 or fp32"
        )


# --- optimization profiles -------------------------------------------------------------------


def compute_profiles(inputs: list[TensorSpec], config: TensorRTEngineConfig) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes per input, from the recipe's profiles and batch range.

    A dynamic batch axis (axis 0) alone gets ``min_batch/opt_batch/max_batch``;
    other dynamic axes need an explicit profile. Static inputs get their shape
    three times (TensorRT needs no profile for them; the metadata records it).

    Raises:
        ConfigError: a profile names no input, disagrees with a static
            dimension or has the wrong rank, or a dynamic axis has no profile.
    """
    names = [i.name for i in inputs]
    for p in config.profiles:
        if p.input not in names:
            raise ConfigError(
                f"engines.profiles: input {p.input!r} is not an input of the ONNX; its inputs: {', '.join(names)}"
            )
    out: dict[str, dict[str, list[int]]] = {}
    for spec in inputs:
        prof = config.profile_for(spec.name)
        if prof is not None:
            if len(prof.min) != len(spec.shape):
                raise ConfigError(
                    f"engines.profiles[{spec.name}]: {len(prof.min)} dimensions, but input {spec.name!r} "
                    f"has {len(spec.shape)} (shape {spec.shape}, -1 is dynamic)"
                )
            for axis, d in enumerate(spec.shape):
                if d > 0 and not prof.min[axis] == prof.opt[axis] == prof.max[axis] == d:
                    raise ConfigError(
                        f"engines.profiles[{spec.name}]: dimension {axis} is fixed at {d} in the ONNX; "
                        f"use {d} for its min, opt and max"
                    )
            out[spec.name] = {"min": list(prof.min), "opt": list(prof.opt), "max": list(prof.max)}
            continue
        dyn = spec.dynamic_axes
        if dyn and dyn != [0]:
            raise ConfigError(
                f"engines.profiles: input {spec.name!r} (shape {spec.shape}) has dynamic dimensions {dyn}; "
                f"only the batch axis gets a default: add '- {{input: {spec.name}, min: [...], opt: [...], "
                "max: [...]}' to engines.profiles"
            )
        lo, mid, hi = (list(spec.shape) for _ in range(3))
        if dyn:
            lo[0], mid[0], hi[0] = config.min_batch, config.opt_batch, config.max_batch
        out[spec.name] = {"min": lo, "opt": mid, "max": hi}
    return out


# --- flags, keys, metadata ---------------------------------------------------------------------


def network_flags(tensorrt_version: str, config: Optional[TensorRTEngineConfig] = None) -> list[str]:
    """``NetworkDefinitionCreationFlag`` names for this TensorRT generation (and config)."""
    if (config or TensorRTEngineConfig()).strongly_typed_for(tensorrt_version):
        return ["STRONGLY_TYPED"]
    if trt_major(tensorrt_version) < 10:
        return ["EXPLICIT_BATCH"]  # implicit batch is the default before 10
    return []


def builder_flags(tensorrt_version: str, config: TensorRTEngineConfig) -> list[str]:
    """``BuilderFlag`` names a build sets, for this TensorRT generation and config.

    Raises:
        ConfigError: the config asks for something this TensorRT cannot do.
    """
    flags: list[str] = []
    if config.strongly_typed_for(tensorrt_version):
        if config.precision == "fp16":  # strongly typed networks take no precision flags
            raise ConfigError(TENSORRT_FEATURES["fp16_flag"].refusal(
                f"TensorRT {tensorrt_version} builds this network strongly typed; use int8 with the Q/DQ "
                "ONNX, or fp32"))
    elif config.precision == "int8":
        flags += ["INT8", "FP16"]
    elif config.precision == "fp16":
        flags.append("FP16")
    if config.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if config.dla_core is not None and config.gpu_fallback:
        flags.append("GPU_FALLBACK")
    return flags


def tensorrt_settings(tensorrt_version: str, config: TensorRTEngineConfig) -> dict[str, list[str]]:
    """Every TensorRT enum member a build of ``config`` uses on this version, per enum.

    The build reads exactly these; tests/unit/test_trt_conformance.py checks
    them against the real bindings of each TensorRT generation.
    """
    return {
        "NetworkDefinitionCreationFlag": network_flags(tensorrt_version, config),
        "BuilderFlag": builder_flags(tensorrt_version, config),
        "MemoryPoolType": ["WORKSPACE"],
        "HardwareCompatibilityLevel": ([config.hardware_compatibility.upper()]
                                       if config.hardware_compatibility != "none" else []),
        "DeviceType": ["DLA"] if config.dla_core is not None else [],
    }


def cache_key(tensorrt_version: str, compute_capability: tuple[int, int]) -> str:
    """The engine cache's key: engines are reusable only for the same TensorRT and GPU architecture."""
    return f"trt{tensorrt_version}-sm{compute_capability[0]}{compute_capability[1]}"


def build_settings(config: TensorRTEngineConfig, profiles: dict) -> dict[str, Any]:
    """The config fields that shape an engine (not where or how it is verified)."""
    return {
        "precision": config.precision, "profiles": profiles, "workspace_mib": config.workspace_mib,
        "dla_core": config.dla_core, "gpu_fallback": config.gpu_fallback,
        "version_compatible": config.version_compatible,
        "strongly_typed": config.strongly_typed,
        "hardware_compatibility": config.hardware_compatibility,
    }


def build_digest(onnx_sha256: str, device_class: str, settings: dict) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "class": device_class, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_metadata(*, device_class: DeviceClass, local: LocalDevice, tensorrt_version: str,
                  info: OnnxInfo, config: TensorRTEngineConfig, profiles: dict, engine_sha256: str,
                  engine_bytes: int, build_seconds: float, io: Optional[dict] = None) -> dict[str, Any]:
    """The facts stored next to an engine, which are also its artifact key.

    ``io`` is what the built engine reports (names, shapes, dtypes); the ONNX's
    inputs and outputs stand in where it is not given.
    """
    cc = local.compute_capability
    key = cache_key(tensorrt_version, cc)
    meta = {
        "format": METADATA_FORMAT,
        "format_version": 1,
        "device_class": device_class.key,
        "tensorrt": tensorrt_version,
        "tensorrt_api": "strongly-typed" if config.strongly_typed_for(tensorrt_version) else "weakly-typed",
        "cuda_driver": local.cuda_driver,
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "device_name": local.name,
        "jetpack": local.jetpack,
        "l4t": local.l4t,
        "network_flags": network_flags(tensorrt_version, config),
        "builder_flags": builder_flags(tensorrt_version, config),
        **build_settings(config, profiles),
        "inputs": (io or {}).get("inputs") or [s.to_dict() for s in info.inputs],
        "outputs": (io or {}).get("outputs") or [s.to_dict() for s in info.outputs],
        "onnx_sha256": info.sha256,
        "sha256": engine_sha256,
        "size_bytes": engine_bytes,
        "cache_key": key,
        "build_seconds": round(build_seconds, 3),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["artifact_key"] = f"{device_class.key}/{key}/{engine_sha256[:16]}"
    return meta


def read_metadata(engine_path: str | Path) -> dict[str, Any]:
    """The ``metadata.json`` next to an engine (``engine_path`` may be the file or its folder).

    Raises:
        DeviceError: there is none, or it is not edgeslim engine metadata.
    """
    p = Path(engine_path)
    meta_path = p / META_FILE if p.is_dir() else p.with_name(META_FILE)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise DeviceError(f"engine metadata {meta_path}: missing or not JSON; keep metadata.json next to "
                          "the engine (build_engine writes it)") from None
    if meta.get("format") != METADATA_FORMAT:
        raise DeviceError(f"engine metadata {meta_path}: not an edgeslim engine (format "
                          f"{meta.get('format')!r}); rebuild it with build_engine")
    return meta


def check_engine_compatible(meta: dict[str, Any], tensorrt_version: str,
                            local: Optional[LocalDevice] = None) -> None:
    """Refuse an engine that this TensorRT runtime (and GPU) cannot run.

    Raises:
        DeviceError: another TensorRT version (unless built version-compatible
            within the same major, for this or a later runtime), or another
            GPU architecture (unless built hardware-compatible).
    """
    built = str(meta.get("tensorrt", "unknown"))
    label = meta.get("device_class", "?")
    if built != tensorrt_version:
        vc_ok = (meta.get("version_compatible") and built != "unknown"
                 and trt_major(built) == trt_major(tensorrt_version)
                 and version_tuple(tensorrt_version) >= version_tuple(built))
        if not vc_ok:
            raise DeviceError(
                f"engine for {label} was built with TensorRT {built}; this runtime is TensorRT "
                f"{tensorrt_version}: engines are not portable across TensorRT versions; rebuild it "
                "here from the Q/DQ ONNX (or build it version-compatible)"
            )
    if local is not None:
        cc = f"{local.compute_capability[0]}.{local.compute_capability[1]}"
        hw = meta.get("hardware_compatibility", "none")
        if meta.get("compute_capability") != cc and not (hw == "ampere_plus" and local.compute_capability >= (8, 0)):
            raise DeviceError(
                f"engine for {label} was built for compute capability {meta.get('compute_capability')}; "
                f"this GPU ({local.name}) is {cc}: rebuild it here from the Q/DQ ONNX"
            )


# --- the build ----------------------------------------------------------------------------------


@dataclasses.dataclass
class BuiltEngine:
    """A built (or cached) engine and what is known about it.

    Attributes:
        engine_path: the serialized engine (``model.engine``).
        metadata: the dict also written to ``metadata.json`` beside it.
        log_path: the builder's log (``build.log``), when a build ran.
        timing_cache_path: the timing cache after the build, when kept.
        cached: True when the engine came from the cache without a build.
    """

    engine_path: Path
    metadata: dict[str, Any]
    log_path: Optional[Path] = None
    timing_cache_path: Optional[Path] = None
    cached: bool = False


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything decided before TensorRT is called: checked on any machine."""

    device_class: DeviceClass
    config: TensorRTEngineConfig
    onnx: OnnxInfo
    profiles: dict[str, dict[str, list[int]]]
    tensorrt_versions: tuple[str, ...] = ()


def plan_build(onnx_path: str | Path, device_class: str,
               config: Optional[TensorRTEngineConfig] = None) -> BuildPlan:
    """Check an engine build without a GPU: device class, config, Q/DQ, profiles, and that every TensorRT
    release the class admits (``engines.min_tensorrt`` narrows it) builds the settings and parses the ONNX.

    Raises:
        DeviceError: unknown device class (lists the known ones).
        ConfigError: the config does not suit the class, or a profile is wrong.
        SourceError: the ONNX is missing, unreadable, has no Q/DQ for int8, or has an opset or op some
            TensorRT release of the class cannot parse.
    """
    dc = get_device_class(device_class)
    config = config or TensorRTEngineConfig()
    if device_class not in config.device_classes:
        # Re-validate the settings against this class (DLA cores, JetPack limits, ...).
        config = dataclasses.replace(config, device_classes=[*config.device_classes, device_class])
    info = inspect_onnx(onnx_path)
    require_qdq(info, config.precision)
    versions = config.tensorrt_versions_for(device_class)
    problem = parser_problem(info.path.name, info.opset, set(info.ops), device_class, versions)
    if problem:
        raise SourceError(problem)
    return BuildPlan(dc, config, info, compute_profiles(info.inputs, config), versions)


def build_engine(onnx_path: str | Path, out_dir: str | Path, device_class: str,
                 config: Optional[TensorRTEngineConfig] = None, *, cache_dir: str | Path | None = None,
                 timing_cache: str | Path | None = None, local: Optional[LocalDevice] = None) -> BuiltEngine:
    """Build the TensorRT engine of ``onnx_path`` for ``device_class`` on this node.

    Writes ``model.engine``, ``metadata.json``, ``build.log`` and (with
    ``config.timing_cache``) ``timing.cache`` into ``out_dir``.

    Args:
        onnx_path: the Q/DQ ONNX (or a float ONNX for fp16/fp32).
        out_dir: folder for the engine and its metadata.
        device_class: an exact device-class key; this node must be of it.
        config: build settings; ``None`` uses the defaults.
        cache_dir: an engine cache keyed by (TensorRT version, compute
            capability); a hit is copied instead of rebuilt, and the timing
            cache of the key lives there too.
        timing_cache: a timing cache from an earlier build of this class to
            start from (e.g. downloaded from MLflow); overrides the cache_dir one.
        local: what this node has; detected when ``None``.

    Returns:
        The ``BuiltEngine``.

    Raises:
        DeviceError: unknown class, no CUDA device, this node is of another
            class, or TensorRT failed (the message points at build.log).
        MissingDependencyError: TensorRT is not installed on this GPU node.
        ConfigError, SourceError: see :func:`plan_build`.
    """
    plan = plan_build(onnx_path, device_class, config)
    config = plan.config
    local = local or detect_local_device()
    if local is None:
        raise DeviceError(f"cannot build for {device_class}: no CUDA device on this node; run the build on "
                          "a GPU node of that class or on the device itself")
    match_device_class(device_class, local, hardware_compatibility=config.hardware_compatibility)
    trt = import_tensorrt(f"building a TensorRT engine for {device_class} on {local.name}", device_class)
    version = str(trt.__version__)
    if local.tensorrt != version:
        local = dataclasses.replace(local, tensorrt=version)
        match_device_class(device_class, local, hardware_compatibility=config.hardware_compatibility)
    problem = config.tensorrt_version_problem(version, device_class)
    if problem:  # e.g. same_compute_capability on a 10.x before 10.9: refused before TensorRT is asked
        raise DeviceError(problem)
    settings = build_settings(config, plan.profiles)
    key = cache_key(version, local.compute_capability)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / key / build_digest(plan.onnx.sha256, device_class, settings)
        hit = _cache_lookup(entry, out_dir)
        if hit is not None:
            return hit
        if timing_cache is None and config.timing_cache:
            timing_cache = Path(cache_dir) / key / f"{device_class}.{TIMING_CACHE_FILE}"

    t0 = time.perf_counter()
    cache_blob = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    lines: list[str] = []
    try:
        plan_bytes, new_cache, io = _build_with_tensorrt(trt, plan, cache_blob, lines)
    finally:
        (out_dir / LOG_FILE).write_text("\n".join(lines) + "\n")
    engine_path = out_dir / ENGINE_FILE
    engine_path.write_bytes(plan_bytes)
    meta = make_metadata(device_class=plan.device_class, local=local, tensorrt_version=version,
                         info=plan.onnx, config=config, profiles=plan.profiles,
                         engine_sha256=hashlib.sha256(plan_bytes).hexdigest(),
                         engine_bytes=len(plan_bytes), build_seconds=time.perf_counter() - t0, io=io)
    meta["timing_cache_reused"] = bool(cache_blob)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    tc_path = None
    if config.timing_cache and new_cache:
        tc_path = out_dir / TIMING_CACHE_FILE
        tc_path.write_bytes(new_cache)
    if entry is not None:
        entry.mkdir(parents=True, exist_ok=True)
        for name in (ENGINE_FILE, META_FILE, LOG_FILE):
            shutil.copyfile(out_dir / name, entry / name)
        if tc_path is not None:
            shutil.copyfile(tc_path, Path(cache_dir) / key / f"{device_class}.{TIMING_CACHE_FILE}")
    return BuiltEngine(engine_path, meta, out_dir / LOG_FILE, tc_path, cached=False)


def _cache_lookup(entry: Path, out_dir: Path) -> Optional[BuiltEngine]:
    engine, meta_path = entry / ENGINE_FILE, entry / META_FILE
    if not (engine.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if file_sha256(engine) != meta.get("sha256"):
        log.warning("engine cache entry %s is corrupt (sha256 differs); rebuilding", entry)
        return None
    for p in (engine, meta_path, entry / LOG_FILE):
        if p.is_file():
            shutil.copyfile(p, out_dir / p.name)
    return BuiltEngine(out_dir / ENGINE_FILE, meta, out_dir / LOG_FILE, None, cached=True)


def _build_with_tensorrt(trt, plan: BuildPlan, cache_blob: bytes, lines: list[str]):
    """The TensorRT calls. Returns (engine bytes, timing cache bytes, io description)."""
    config = plan.config
    version = str(trt.__version__)
    use = tensorrt_settings(version, config)
    with Steps(version, lines) as step:
        step("create its builder")
        logger = collecting_logger(trt, lines)
        builder = trt.Builder(logger)
        step("create the network")
        net_flags = 0
        for name in use["NetworkDefinitionCreationFlag"]:
            net_flags |= 1 << int(enum_member(trt, "NetworkDefinitionCreationFlag", name))
        network = builder.create_network(net_flags)
        step("create the ONNX parser")
        parser = trt.OnnxParser(network, logger)
        step(f"parse {plan.onnx.path.name}")
        if not parser.parse_from_file(str(plan.onnx.path)):
            errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
            raise SourceError(f"TensorRT {version} cannot parse {plan.onnx.path.name}: "
                              f"{errors[0] if errors else log_problems(lines)}; see {LOG_FILE}")

        step("configure the build")
        cfg = builder.create_builder_config()
        cfg.set_memory_pool_limit(enum_member(trt, "MemoryPoolType", "WORKSPACE"), config.workspace_mib << 20)
        for name in use["BuilderFlag"]:
            cfg.set_flag(enum_member(trt, "BuilderFlag", name))
        for name in use["HardwareCompatibilityLevel"]:
            cfg.hardware_compatibility_level = enum_member(trt, "HardwareCompatibilityLevel", name)
        if config.dla_core is not None:
            if config.dla_core >= builder.num_DLA_cores:
                raise DeviceError(f"engines.dla_core is {config.dla_core}, but this device has "
                                  f"{builder.num_DLA_cores} DLA core(s); pick one below that or null")
            cfg.default_device_type = enum_member(trt, "DeviceType", "DLA")
            cfg.DLA_core = config.dla_core
        if any(s.dynamic_axes for s in plan.onnx.inputs):
            profile = builder.create_optimization_profile()
            for spec in plan.onnx.inputs:
                if spec.dynamic_axes:
                    p = plan.profiles[spec.name]
                    profile.set_shape(spec.name, p["min"], p["opt"], p["max"])
            cfg.add_optimization_profile(profile)
        if config.timing_cache:
            step("set up the timing cache")
            _attach_timing_cache(cfg, cache_blob, lines)

        step(f"build the engine for {plan.device_class.key}")
        serialized = builder.build_serialized_network(network, cfg)
        if serialized is None:
            raise DeviceError(f"TensorRT {version} could not build the engine for {plan.device_class.key}: "
                              f"{log_problems(lines)}; see {LOG_FILE}")
        step("read the timing cache and the network's inputs and outputs")
        kept = cfg.get_timing_cache() if config.timing_cache else None
        new_cache = bytes(kept.serialize()) if kept is not None else b""
        io = _io_of_network(trt, network)
        return bytes(serialized), new_cache, io


def _attach_timing_cache(cfg, cache_blob: bytes, lines: list[str]) -> None:
    """The previous timing cache if this TensorRT and GPU take it, else an empty one."""
    if cache_blob:
        try:
            cache = cfg.create_timing_cache(cache_blob)
        except TENSORRT_FAILURES:  # a blob this TensorRT cannot read at all
            cache = None
        if cache is not None and cfg.set_timing_cache(cache, False):
            return
        lines.append("[edgeslim] the previous timing cache does not match this TensorRT/GPU; starting empty")
    empty = cfg.create_timing_cache(b"")
    if empty is None or not cfg.set_timing_cache(empty, False):
        lines.append("[edgeslim] TensorRT refused an empty timing cache; building without one")


def _io_of_network(trt, network) -> dict[str, list[dict]]:
    def dtype(t) -> str:
        try:  # numpy names, like the ONNX side of the metadata
            return np.dtype(trt.nptype(t.dtype)).name
        except (TypeError, KeyError):
            return str(t.dtype).split(".")[-1].lower()

    def spec(t):
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": dtype(t)}

    return {"inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)]}
