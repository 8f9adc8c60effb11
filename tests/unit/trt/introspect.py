"""Runs where ``import tensorrt`` is one version's real bindings over stub libraries (see harness.py).

    python introspect.py snapshot            one JSON line: the version's snapshot
    python introspect.py exercise WORK ONNX  one JSON line: {"snapshot": ..., "exercise": ...}

The snapshot is what the mocked ``tensorrt`` of the unit tests is generated from:
every enum with its members and values, the public members (and the pybind
signatures of the methods) of the classes edgeslim's builder, runner, agent and
the mock touch, the module's top-level names, and what ``nptype`` makes of each
``DataType``. ``exercise`` runs edgeslim's own code against the real module as
far as it goes without a GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

CLASSES = ("Builder", "IBuilderConfig", "INetworkDefinition", "ITensor", "OnnxParser", "ParserError",
           "IOptimizationProfile", "ITimingCache", "IHostMemory", "Runtime", "ICudaEngine", "IExecutionContext",
           "ILogger", "Logger")
# Dunder methods the mock or edgeslim rely on, recorded where a class defines them itself.
DUNDERS = ("__init__", "__str__", "__int__", "__len__", "__getitem__", "__buffer__", "__enter__", "__exit__")


def _is_enum(obj) -> bool:
    return isinstance(obj, type) and isinstance(getattr(obj, "__members__", None), dict)


def _signatures(func) -> list[str]:
    name = getattr(func, "__name__", "")
    lines = (getattr(func, "__doc__", None) or "").splitlines()
    sigs = [ln.strip() for ln in lines if ln.strip().split(". ", 1)[-1].startswith(f"{name}(")]
    return [s.split(". ", 1)[-1] if s[:1].isdigit() else s for s in sigs]


def snapshot(trt) -> dict:
    import numpy as np

    enums, classes, signatures = {}, {}, {}
    for name in sorted(dir(trt)):
        if not name.startswith("_") and _is_enum(getattr(trt, name)):
            enums[name] = {k: int(v) for k, v in getattr(trt, name).__members__.items()}
    for cname in CLASSES:
        cls = getattr(trt, cname, None)
        if cls is None:
            continue
        members = sorted({n for n in dir(cls) if not n.startswith("_")} | {n for n in DUNDERS if n in vars(cls)})
        classes[cname] = members
        for m in members:
            attr = getattr(cls, m)
            if _is_enum(attr):
                enums[f"{cname}.{m}"] = {k: int(v) for k, v in attr.__members__.items()}
            elif callable(attr) and not isinstance(attr, type) and _signatures(attr):
                signatures[f"{cname}.{m}"] = _signatures(attr)
    nptype = {}
    for member, value in trt.DataType.__members__.items():
        try:
            nptype[member] = np.dtype(trt.nptype(value)).name
        except TypeError:  # BF16, FP8, INT4, FP4, ...: numpy has no such type
            nptype[member] = None
    return {"version": str(trt.__version__),
            "toplevel": sorted({n for n in dir(trt) if not n.startswith("_")} | {"__version__"}),
            "enums": enums, "classes": classes, "signatures": signatures, "nptype": nptype}


def _class_and_node(version: str):
    """A device class of this TensorRT and a node (``LocalDevice``) of it."""
    from edgeslim.components.engine import devices
    from edgeslim.components.engine.devices import DeviceClass, LocalDevice

    major = int(version.split(".")[0])
    if major < 10:  # no built-in class runs 8.6 (Xavier is 8.5): one for this check
        dc = devices.register_device_class(DeviceClass("conformance-sm86-trt8.6", "datacenter", "Ampere", (8, 6),
                                                       "8.6", description="TensorRT 8.6 conformance"))
        return dc.key, LocalDevice("NVIDIA A10", (8, 6), "12.0", version)
    if version.startswith("10.3."):
        return "orin-sm87-jp6.1-trt10.3", LocalDevice("Orin", (8, 7), "12.6", version, jetpack="6.1", l4t="36.4.0")
    if major == 10:
        return "ada-sm89-trt10", LocalDevice("NVIDIA L4", (8, 9), "12.8", version)
    return "hopper-sm90-trt11", LocalDevice("NVIDIA H100", (9, 0), "13.0", version)


def _attempt(fn) -> dict:
    from edgeslim.components.common.errors import EdgeslimError

    try:
        value = fn()
    except Exception as exc:  # recorded: the test says which are right
        return {"raised": type(exc).__name__, "edgeslim": isinstance(exc, EdgeslimError), "message": str(exc)}
    return {"raised": None, "value": value}


def exercise(trt, work: Path, onnx_path: Path) -> dict:
    import numpy as np

    from edgeslim.components.engine import builder as eng
    from edgeslim.components.engine import runner as engine_runner
    from edgeslim.components.engine.tensorrt_calls import collecting_logger, tensorrt_available
    from edgeslim.components.engine.config import TensorRTEngineConfig
    from edgeslim.components.engine.devices import LocalDevice
    from edgeslim.deploy.manifest import encode_array

    version = str(trt.__version__)
    key, local = _class_and_node(version)
    out: dict = {"device_class": key, "tensorrt_available": list(tensorrt_available())}

    # The builder, as far as it goes without a GPU: trt.Builder(...) gets a null builder.
    out["build"] = _attempt(lambda: eng.build_engine(onnx_path, work / "build", key, local=local))
    # A setting this TensorRT may lack (SAME_COMPUTE_CAPABILITY came with 10.9), on a datacenter node.
    dc_key, dc_node = (key, local) if not local.is_jetson else ("ada-sm89-trt10", LocalDevice(
        "NVIDIA L4", (8, 9), "12.8", version))
    # The class admits 10.0-10.16: its build nodes are narrowed to the releases with the setting.
    out["same_compute_capability"] = _attempt(lambda: eng.build_engine(
        onnx_path, work / "same_cc", dc_key, local=dc_node, config=TensorRTEngineConfig(
            hardware_compatibility="same_compute_capability", device_classes=[dc_key],
            min_tensorrt={dc_key: "10.9"} if dc_key == "ada-sm89-trt10" else {})))

    # An engine folder of this version and class; the CUDA driver is stood in for (no GPU here), so the
    # runner gets as far as trt.Runtime(...).
    plan = eng.plan_build(onnx_path, key)
    meta = eng.make_metadata(device_class=plan.device_class, local=local, tensorrt_version=version,
                             info=plan.onnx, config=plan.config, profiles=plan.profiles,
                             engine_sha256="0" * 64, engine_bytes=0, build_seconds=0.0)
    meta.pop("sha256")

    class NoCudaDevice:
        stream = None

        def close(self):
            pass

    engine_runner.CudaDriver = NoCudaDevice  # the edge pyfunc's runner below gets it too
    engine_dir = work / "engines" / key
    engine_dir.mkdir(parents=True)
    (engine_dir / eng.ENGINE_FILE).write_bytes(b"not an engine")
    (engine_dir / eng.META_FILE).write_text(json.dumps(meta))
    out["runner"] = _attempt(lambda: engine_runner.EngineRunner(engine_dir, local=local))

    lines: list[str] = []
    logger = collecting_logger(trt, lines)
    logger.log(trt.ILogger.Severity.ERROR, "conformance\nline")
    out["logger"] = lines

    shape = [d if d > 0 else 2 for d in plan.onnx.inputs[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)

    # The edge pyfunc: TensorRT is installed and the engine fits, but TensorRT cannot load it.
    from edgeslim.plugins import edge_flavor as flavor

    flavor._flavor_conf = lambda root: {}  # no MLmodel here; keeps mlflow out of this process
    model_dir = work / "model"
    shutil.copytree(work / "engines", model_dir / flavor.ENGINES_DIR)
    shutil.copyfile(onnx_path, model_dir / flavor.MODEL_FILE)

    def edge_model():
        m = flavor.EdgeModel(model_dir, local=local, tensorrt_version=version)
        return {"backend": m.backend, "reason": m.choice.reason, "predict_backend": m.predict(x)["backend"]}

    out["edge_model"] = _attempt(edge_model)

    # The device agent's health check, which loads engines through Polygraphy.
    from edgeslim.components.common.onnx_runtime import make_session
    from edgeslim.deploy.agent.health import run_health_check

    release = work / "release"
    release.mkdir()
    shutil.copyfile(onnx_path, release / "model.onnx")
    (release / "model.engine").write_bytes(b"not an engine")
    sess = make_session(release / "model.onnx", threads=1)
    golden = sess.run(None, {sess.get_inputs()[0].name: x})
    check = {"input": encode_array(x), "atol": 1e-4, "rtol": 1e-4,
             "outputs": {o.name: encode_array(v) for o, v in zip(sess.get_outputs(), golden)}}
    out["health"] = run_health_check(release, check)
    return out


def main(argv: list[str]) -> int:
    import tensorrt as trt

    if argv[:1] == ["snapshot"]:
        print(json.dumps(snapshot(trt), sort_keys=True))
        return 0
    if argv[:1] == ["exercise"] and len(argv) == 3:
        work, onnx_path = Path(argv[1]), Path(argv[2])
        result = {"snapshot": snapshot(trt), "exercise": exercise(trt, work, onnx_path)}
        print(json.dumps(result, sort_keys=True, default=str))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
