"""The builder's and runner's TensorRT calls, against a mocked TensorRT module.

There is no GPU or TensorRT here, so ``MockedTensorRT`` stands in for the
``tensorrt`` module: it records the calls the builder makes (network flags,
builder flags, profiles, timing cache, DLA) and "builds" an engine whose bytes
name the ONNX; its execution context runs that ONNX with ONNX Runtime, and
``MockedCuda`` keeps "device memory" in host buffers. What this checks is
edgeslim's side: which API generation is used, what is set, what is
written, and how batches are split and padded. Real builds: tests/gpu.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from test_engine_fixtures import INPUT, OUTPUT, make_digits_onnx

from edgeslim.components.engine import builder as eng
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import DeviceError
from edgeslim.components.engine.devices import LocalDevice

L4 = LocalDevice("NVIDIA L4", (8, 9), "12.8", None)
H100 = LocalDevice("NVIDIA H100", (9, 0), "13.0", None)
ORIN = LocalDevice("Orin", (8, 7), "12.6", None, jetpack="6.1", l4t="36.4.0")


class _Enum:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


def mocked_tensorrt(version: str, calls: list, *, fail_build=False, dla_cores=0):
    """A stand-in ``tensorrt`` module (mocked): records calls, 'engines' are ONNX paths."""
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = _Enum("EXPLICIT_BATCH", "EXPLICIT_PRECISION", "STRONGLY_TYPED")
    trt.BuilderFlag = _Enum("FP16", "INT8", "DEBUG", "GPU_FALLBACK", "VERSION_COMPATIBLE")
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.DeviceType = _Enum("GPU", "DLA")
    trt.HardwareCompatibilityLevel = _Enum("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
    trt.TensorIOMode = _Enum("NONE", "INPUT", "OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="DataType.FLOAT")
    trt.nptype = lambda dtype: np.float32
    flag_names = {v: k for k, v in vars(trt.BuilderFlag).items()}

    class ILogger:
        def __init__(self):
            pass

    trt.ILogger = ILogger

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, trt.DataType.FLOAT

    class Network:
        def __init__(self):
            self.inputs, self.outputs, self.path = [], [], None

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.num_errors = network, logger, 0

        def parse_from_file(self, path):
            m = onnx.load(path)
            dims = lambda v: tuple(d.dim_value or -1 for d in v.type.tensor_type.shape.dim)  # noqa: E731
            self.network.inputs = [Tensor(i.name, dims(i)) for i in m.graph.input]
            self.network.outputs = [Tensor(o.name, dims(o)) for o in m.graph.output]
            self.network.path = path
            self.logger.log(types.SimpleNamespace(name="INFO"), f"parsed {len(m.graph.node)} nodes")
            return True

    trt.OnnxParser = OnnxParser

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+timings"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = [], [], None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            self.flags.append(flag_names[flag])

        def __setattr__(self, name, value):
            if name in ("hardware_compatibility_level", "default_device_type", "DLA_core"):
                calls.append((name, value))
            object.__setattr__(self, name, value)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, blob):
            calls.append(("timing_cache_in", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, mid, hi):
            self.shapes[name] = (list(lo), list(mid), list(hi))

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, cfg):
            calls.append(("builder_flags", sorted(cfg.flags)))
            calls.append(("profiles", [p.shapes for p in cfg.profiles]))
            if fail_build:
                self.logger.log(types.SimpleNamespace(name="ERROR"), "no implementation for layer fc1")
                return None
            return memoryview(f"MOCKED-ENGINE:{network.path}".encode())

    trt.Builder = Builder
    return trt


class MockedCuda:
    """mocked CUDA driver: 'device memory' is a dict of host buffers."""

    memory: dict[int, bytearray] = {}

    def __init__(self):
        self.stream = types.SimpleNamespace(value=0)

    def alloc(self, nbytes):
        ptr = len(self.memory) + 1
        self.memory[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr):
        self.memory.pop(ptr)

    def to_device(self, ptr, arr):
        self.memory[ptr][:] = arr.tobytes()

    def to_host(self, arr, ptr):
        arr[...] = np.frombuffer(self.memory[ptr], dtype=arr.dtype).reshape(arr.shape)

    def sync(self):
        pass

    def close(self):
        pass


def add_mocked_runtime(trt, static_batch=None):
    """The runtime half of the mocked module: the 'engine' runs its ONNX with ONNX Runtime."""
    from edgeslim.components.common.onnx_runtime import make_session as qdq_session

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr, self.batches = engine, {}, {}, []

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def get_tensor_shape(self, name):
            return (self.shapes[INPUT][0], 10)

        def execute_async_v3(self, stream):
            shape = self.shapes[INPUT]
            self.batches.append(shape[0])
            x = np.frombuffer(MockedCuda.memory[self.addr[INPUT]], np.float32).reshape(shape)
            y = self.engine.session.run(None, {INPUT: x})[0]
            MockedCuda.memory[self.addr[OUTPUT]][:] = y.astype(np.float32).tobytes()
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, onnx_path):
            self.session = qdq_session(onnx_path)

        def get_tensor_name(self, i):
            return (INPUT, OUTPUT)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == INPUT else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return (static_batch or -1, 1, 8, 8) if name == INPUT else (static_batch or -1, 10)

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def create_execution_context(self):
            self.context = Context(self)
            return self.context

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            text = bytes(blob).decode(errors="replace")
            if not text.startswith("MOCKED-ENGINE:"):
                self.logger.log(types.SimpleNamespace(name="ERROR"), "Serialization assertion failed")
                return None
            return Engine(text.split(":", 1)[1])

    trt.Runtime = Runtime
    return trt


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    return make_digits_onnx(tmp_path_factory.mktemp("onnx"))


def install(monkeypatch, trt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(eng, "_CudaDriver", MockedCuda)


def test_tensorrt_10_build_sets_int8_fp16_profiles_workspace_and_writes_everything(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt("10.13.0.35", calls))
    cfg = TensorRTEngineConfig(workspace_mib=512, opt_batch=16, max_batch=32)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert ("network_flags", 0) in calls and ("builder_flags", ["FP16", "INT8"]) in calls
    assert ("workspace", 512 << 20) in calls
    assert ("profiles", [{INPUT: ([1, 1, 8, 8], [16, 1, 8, 8], [32, 1, 8, 8])}]) in calls
    meta = json.loads((tmp_path / eng.META_FILE).read_text())
    assert meta == built.metadata and meta["tensorrt"] == "10.13.0.35" and meta["tensorrt_api"] == "weakly-typed"
    assert meta["sha256"] == eng.file_sha256(built.engine_path)
    assert meta["inputs"] == [{"name": INPUT, "shape": [-1, 1, 8, 8], "dtype": "float32"}]
    assert "parsed" in (tmp_path / eng.LOG_FILE).read_text()
    assert (tmp_path / eng.TIMING_CACHE_FILE).read_bytes() == b"+timings"


def test_tensorrt_11_build_is_strongly_typed_without_precision_flags(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt("11.1.0.5", calls))
    built = eng.build_engine(qdq[1], tmp_path, "hopper-sm90-trt11", local=H100)
    assert ("network_flags", 1 << 2) in calls and ("builder_flags", []) in calls
    assert built.metadata["tensorrt_api"] == "strongly-typed"


def test_jetson_dla_build_with_gpu_fallback(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt("10.3.0.30", calls, dla_cores=2))
    cfg = TensorRTEngineConfig(dla_core=1)
    eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", cfg, local=ORIN)
    assert ("builder_flags", ["FP16", "GPU_FALLBACK", "INT8"]) in calls
    assert ("default_device_type", 1) in calls and ("DLA_core", 1) in calls


def test_dla_core_the_device_lacks_is_refused(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt("10.3.0.30", [], dla_cores=0))  # an Orin Nano has no DLA
    with pytest.raises(DeviceError, match="this device has 0 DLA core"):
        eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", TensorRTEngineConfig(dla_core=0), local=ORIN)


def test_wrong_tensorrt_on_the_build_node_is_refused(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt("10.13.0.35", []))
    with pytest.raises(DeviceError, match="needs TensorRT 10.3; this node has TensorRT 10.13.0.35"):
        eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", local=ORIN)


def test_failed_build_points_at_the_log(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt("10.13.0.35", [], fail_build=True))
    with pytest.raises(DeviceError, match=r"no implementation for layer fc1; see build.log"):
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    assert "[ERROR] no implementation" in (tmp_path / eng.LOG_FILE).read_text()
    assert not (tmp_path / eng.ENGINE_FILE).exists()


def test_engine_cache_hit_skips_the_build_and_timing_cache_is_reused(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt("10.13.0.35", calls))
    first = eng.build_engine(qdq[1], tmp_path / "a", "ada-sm89-trt10", local=L4, cache_dir=tmp_path / "cache")
    assert not first.cached and ("timing_cache_in", b"") in calls
    n = len(calls)
    again = eng.build_engine(qdq[1], tmp_path / "b", "ada-sm89-trt10", local=L4, cache_dir=tmp_path / "cache")
    assert again.cached and len(calls) == n and again.metadata["sha256"] == first.metadata["sha256"]
    other = eng.build_engine(qdq[1], tmp_path / "c", "ada-sm89-trt10", TensorRTEngineConfig(max_batch=8),
                             local=L4, cache_dir=tmp_path / "cache")
    assert not other.cached and ("timing_cache_in", b"+timings") in calls  # the class's timing cache
    assert other.metadata["timing_cache_reused"] is True


def test_runner_splits_batches_at_the_profile_maximum(qdq, tmp_path, monkeypatch):
    from edgeslim.components.common.onnx_runtime import make_session as qdq_session, run_batched as run_session

    trt = add_mocked_runtime(mocked_tensorrt("10.13.0.35", []))
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", TensorRTEngineConfig(max_batch=32), local=L4)
    runner = eng.EngineRunner(built.engine_path, local=L4)
    x = qdq[2].x_test[:70]
    out = runner.run(x)[OUTPUT]
    assert runner.engine.context.batches == [32, 32, 6]
    np.testing.assert_allclose(out, run_session(qdq_session(qdq[1]), x), rtol=1e-5, atol=1e-5)
    assert runner.backend == "tensorrt:ada-sm89-trt10"


def test_runner_pads_a_fixed_batch_engine(qdq, tmp_path, monkeypatch):
    trt = add_mocked_runtime(mocked_tensorrt("10.13.0.35", []), static_batch=4)
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    runner = eng.EngineRunner(built.engine_path, local=L4)
    out = runner.run({INPUT: qdq[2].x_test[:6]})[OUTPUT]
    assert out.shape == (6, 10) and runner.engine.context.batches == [4, 4]


def test_runner_reports_an_engine_tensorrt_cannot_load(qdq, tmp_path, monkeypatch):
    trt = add_mocked_runtime(mocked_tensorrt("10.13.0.35", []))
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    built.engine_path.write_bytes(b"garbage")
    with pytest.raises(DeviceError, match="sha256 differs from its metadata"):
        eng.EngineRunner(built.engine_path, local=L4)
    meta = dict(built.metadata, sha256=eng.file_sha256(built.engine_path))  # intact bytes, unloadable
    with pytest.raises(DeviceError, match="cannot deserialize .*Serialization assertion failed"):
        eng.EngineRunner(built.engine_path, meta, local=L4)
