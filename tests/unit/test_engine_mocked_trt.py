"""The builder's and runner's TensorRT calls, against a mocked TensorRT module generated from the real one.

There is no GPU here, so a mocked ``tensorrt`` stands in for the module. It is
generated from the snapshot of one real TensorRT version (``MockedTensorRT`` in
test_engine_fixtures.py; tests/unit/test_trt_conformance.py checks the snapshots
against the real bindings): its enums carry the real members and values, and
every mocked class may have only what the real class has. It records the calls
the builder makes (network flags, builder flags, profiles, timing cache, DLA),
"builds" an engine whose bytes name the ONNX, and its execution context runs
that ONNX with ONNX Runtime; ``MockedCuda`` keeps "device memory" in host
buffers. It also fails the way the real one does: a builder or runtime that
cannot be created (``factory function returned nullptr``), a parser error, a
timing cache that does not fit, an engine it cannot deserialize, ``nptype`` on
BF16/FP8/INT4/FP4. What this checks is edgeslim's side. Real builds: tests/gpu.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from test_engine_fixtures import INPUT, OUTPUT, FakeAttribute, MockedTensorRT, make_digits_onnx, trt_snapshot

from edgeslim.components.common.errors import DeviceError, EdgeslimError, SourceError
from edgeslim.components.engine import builder as eng
from edgeslim.components.engine import runner as engine_runner
from edgeslim.components.engine import tensorrt_calls
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.engine.devices import TENSORRT_FEATURES, LocalDevice

TRT10, TRT10_JETPACK6, TRT11, TRT8_5 = "10.16.1.11", "10.3.0", "11.4.0.106", "8.5.2.2"
L4 = LocalDevice("NVIDIA L4", (8, 9), "12.8", None)
H100 = LocalDevice("NVIDIA H100", (9, 0), "13.0", None)
ORIN = LocalDevice("Orin", (8, 7), "12.6", None, jetpack="6.1", l4t="36.4.0")
XAVIER = LocalDevice("Xavier", (7, 2), "11.4", None, jetpack="5.1", l4t="35.2.1")
NULLPTR = "pybind11::init(): factory function returned nullptr"


def mocked_tensorrt(version: str, calls: list, *, fail_build=False, dla_cores=0, no_device=False,
                    parse_errors=()):
    """The mocked ``tensorrt`` of ``version`` (a snapshot): records calls, 'engines' are ONNX paths."""
    import onnx

    mocked = MockedTensorRT(version)
    trt = mocked.module
    object.__setattr__(trt, "__mocked__", mocked)

    class ILogger(mocked.base("ILogger")):
        def __init__(self):
            pass

    trt.ILogger = ILogger
    severity = ILogger.Severity

    def create(logger):
        """What the bindings do where the driver or CUDA does not fit: log, then return a null object."""
        if no_device:
            logger.log(severity.WARNING, "CUDA initialization failure with error: 35. Please check your "
                                         "CUDA installation")
            raise TypeError(NULLPTR)

    class ITensor(mocked.base("ITensor")):
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, trt.DataType.FLOAT

    class INetworkDefinition(mocked.base("INetworkDefinition")):
        def __init__(self):
            self._inputs, self._outputs, self._path = [], [], None

        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_input(self, index):
            return self._inputs[index]

        def get_output(self, index):
            return self._outputs[index]

    class ParserError(mocked.base("ParserError")):
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return f"In node 1 with name: fc1 and operator: Gemm (parseNode): UNSUPPORTED_NODE: {self._desc}"

    class OnnxParser(mocked.base("OnnxParser")):
        def __init__(self, network, logger):
            self._network, self._logger, self._errors = network, logger, []

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index):
            return self._errors[index]

        def parse_from_file(self, model):
            if parse_errors:
                self._errors = [ParserError(e) for e in parse_errors]
                for e in self._errors:
                    self._logger.log(severity.ERROR, f"ModelImporter.cpp: {e}")
                return False
            m = onnx.load(model)
            dims = lambda v: tuple(d.dim_value or -1 for d in v.type.tensor_type.shape.dim)  # noqa: E731
            self._network._inputs = [ITensor(i.name, dims(i)) for i in m.graph.input]
            self._network._outputs = [ITensor(o.name, dims(o)) for o in m.graph.output]
            self._network._path = model
            self._logger.log(severity.INFO, f"parsed {len(m.graph.node)} nodes")
            return True

    trt.OnnxParser = OnnxParser

    class ITimingCache(mocked.base("ITimingCache")):
        def __init__(self, blob):
            self._blob = bytes(blob)

        def serialize(self):
            return self._blob + b"+timings"

    class IBuilderConfig(mocked.base("IBuilderConfig")):
        def __init__(self):
            self._flags, self._profiles, self._cache, self._logger = [], [], None, None

        def set_memory_pool_limit(self, pool, pool_size):
            calls.append(("workspace", pool_size))

        def set_flag(self, flag):
            self._flags.append(flag.name)

        def __setattr__(self, name, value):
            if name in ("hardware_compatibility_level", "default_device_type", "DLA_core"):
                calls.append((name, value))
            super().__setattr__(name, value)

        def add_optimization_profile(self, profile):
            self._profiles.append(profile)

        def create_timing_cache(self, serialized_timing_cache):
            calls.append(("timing_cache_in", bytes(serialized_timing_cache)))
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache._blob and not cache._blob.endswith(b"+timings"):  # another TensorRT's or GPU's cache
                self._logger.log(severity.ERROR, "Timing cache header mismatch: the cache was created on a "
                                                 "different device or TensorRT")
                return False
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class IOptimizationProfile(mocked.base("IOptimizationProfile")):
        def __init__(self):
            self._shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002  (the real parameter names)
            self._shapes[input] = (list(min), list(opt), list(max))

    class Builder(mocked.base("Builder")):
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            create(logger)
            self._logger = logger

        def create_network(self, flags=0):
            calls.append(("network_flags", flags))
            return INetworkDefinition()

        def create_builder_config(self):
            cfg = IBuilderConfig()
            cfg._logger = self._logger
            return cfg

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            calls.append(("builder_flags", sorted(config._flags)))
            calls.append(("profiles", [p._shapes for p in config._profiles]))
            if fail_build:
                self._logger.log(severity.ERROR, "no implementation for layer fc1")
                return None
            return memoryview(f"MOCKED-ENGINE:{network._path}".encode())

    trt.Builder = Builder
    trt.__mocked__.create = create
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


def add_mocked_runtime(trt, static_batch=None, *, output_dtype="FLOAT", fail_execute=False):
    """The runtime half of the mocked module: the 'engine' runs its ONNX with ONNX Runtime."""
    from edgeslim.components.common.onnx_runtime import make_session as qdq_session

    mocked = trt.__mocked__
    severity = trt.ILogger.Severity

    class IExecutionContext(mocked.base("IExecutionContext")):
        def __init__(self, engine):
            self._engine, self._shapes, self._addr, self._batches = engine, {}, {}, []

        def set_input_shape(self, name, shape):
            self._shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, memory):
            self._addr[name] = memory
            return True

        def get_tensor_shape(self, name):
            return (self._shapes[INPUT][0], 10)

        def execute_async_v3(self, stream_handle):
            if fail_execute:
                self._engine._logger.log(severity.ERROR, "CUDA error 700: an illegal memory access was encountered")
                return False
            shape = self._shapes[INPUT]
            self._batches.append(shape[0])
            x = np.frombuffer(MockedCuda.memory[self._addr[INPUT]], np.float32).reshape(shape)
            y = self._engine._session.run(None, {INPUT: x})[0]
            MockedCuda.memory[self._addr[OUTPUT]][:] = y.astype(np.float32).tobytes()
            return True

    class ICudaEngine(mocked.base("ICudaEngine")):
        num_io_tensors = 2

        def __init__(self, onnx_path, logger):
            self._session, self._logger = qdq_session(onnx_path), logger

        def get_tensor_name(self, index):
            return (INPUT, OUTPUT)[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == INPUT else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return (static_batch or -1, 1, 8, 8) if name == INPUT else (static_batch or -1, 10)

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT if name == INPUT else getattr(trt.DataType, output_dtype)

        def create_execution_context(self):
            return IExecutionContext(self)

    class Runtime(mocked.base("Runtime")):
        def __init__(self, logger):
            mocked.create(logger)
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            text = bytes(serialized_engine).decode(errors="replace")
            if not text.startswith("MOCKED-ENGINE:"):
                self._logger.log(severity.ERROR, "Serialization assertion failed")
                return None
            return ICudaEngine(text.split(":", 1)[1], self._logger)

    trt.Runtime = Runtime
    return trt


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    return make_digits_onnx(tmp_path_factory.mktemp("onnx"))


def install(monkeypatch, trt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engine_runner, "CudaDriver", MockedCuda)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert isinstance(exc, EdgeslimError) and msg and "\n" not in msg, msg
    return msg


# --- the mock is the real API ---------------------------------------------------------------------


@pytest.mark.parametrize("version, flags", [
    (TRT8_5, {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}),
    ("8.6.1", {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}),
    (TRT10_JETPACK6, {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}),
    (TRT10, {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2,
             "PREFER_AOT_PYTHON_PLUGINS": 3}),
    (TRT11, {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}),
])
def test_mocked_enums_are_the_real_ones(version, flags):
    trt = mocked_tensorrt(version, [])
    assert {k: int(v) for k, v in trt.NetworkDefinitionCreationFlag.__members__.items()} == flags
    weak = trt.__version__.split(".")[0] != "11"
    assert hasattr(trt.BuilderFlag, "INT8") == hasattr(trt.BuilderFlag, "FP16") == weak  # 11 removed them
    same_cc = TENSORRT_FEATURES["hardware_compatibility.same_compute_capability"].supported_by(trt.__version__)
    assert hasattr(trt, "HardwareCompatibilityLevel") == (version != TRT8_5)  # came with 8.6
    assert hasattr(getattr(trt, "HardwareCompatibilityLevel", None), "SAME_COMPUTE_CAPABILITY") == same_cc


@pytest.mark.parametrize("version", [TRT8_5, TRT10_JETPACK6, TRT10, TRT11])
def test_mocked_nptype_refuses_what_numpy_cannot_hold(version):
    trt = mocked_tensorrt(version, [])
    assert trt.nptype(trt.DataType.FLOAT) is np.float32 and trt.nptype(trt.DataType.INT8) is np.int8
    for name in ("BF16", "FP8", "INT4", "FP4"):
        if hasattr(trt.DataType, name):
            with pytest.raises(TypeError, match="Could not resolve TensorRT datatype"):
                trt.nptype(getattr(trt.DataType, name))


def test_a_fake_attribute_cannot_exist_in_the_mock():
    mocked = MockedTensorRT(TRT10)
    with pytest.raises(FakeAttribute, match=r"\['build_engine'\]"):  # TensorRT 8.x's, gone in 10
        class Builder(mocked.base("Builder")):
            def build_engine(self, network, config):
                pass
    with pytest.raises(FakeAttribute, match="has no class 'IBuilder'"):
        mocked.base("IBuilder")
    with pytest.raises(FakeAttribute, match="'max_workspace_size'"):
        mocked.module.max_workspace_size = 1

    class IBuilderConfig(mocked.base("IBuilderConfig")):
        pass

    cfg = IBuilderConfig()
    cfg.DLA_core = 0
    with pytest.raises(AttributeError, match="no attribute 'max_workspace_size'"):
        cfg.max_workspace_size = 1 << 30
    with pytest.raises(AttributeError):
        MockedTensorRT(TRT11).module.BuilderFlag.FP16  # noqa: B018  (11 removed it)
    assert "FP16" in trt_snapshot(TRT10)["enums"]["BuilderFlag"]


# --- builds -------------------------------------------------------------------------------------


def test_tensorrt_10_build_sets_int8_fp16_profiles_workspace_and_writes_everything(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    cfg = TensorRTEngineConfig(workspace_mib=512, opt_batch=16, max_batch=32)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert ("network_flags", 0) in calls and ("builder_flags", ["FP16", "INT8"]) in calls
    assert ("workspace", 512 << 20) in calls
    assert ("profiles", [{INPUT: ([1, 1, 8, 8], [16, 1, 8, 8], [32, 1, 8, 8])}]) in calls
    meta = json.loads((tmp_path / eng.META_FILE).read_text())
    assert meta == built.metadata and meta["tensorrt"] == TRT10 and meta["tensorrt_api"] == "weakly-typed"
    assert meta["sha256"] == eng.file_sha256(built.engine_path)
    assert meta["inputs"] == [{"name": INPUT, "shape": [-1, 1, 8, 8], "dtype": "float32"}]
    assert "parsed" in (tmp_path / eng.LOG_FILE).read_text()
    assert (tmp_path / eng.TIMING_CACHE_FILE).read_bytes() == b"+timings"


def test_tensorrt_11_build_is_strongly_typed_without_precision_flags(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT11, calls))
    built = eng.build_engine(qdq[1], tmp_path, "hopper-sm90-trt11", local=H100)
    # STRONGLY_TYPED is member 0 in TensorRT 11: the flags word is 1 << 0.
    assert ("network_flags", 1) in calls and ("builder_flags", []) in calls
    assert built.metadata["tensorrt_api"] == "strongly-typed"


def test_tensorrt_10_strongly_typed_on_request(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", TensorRTEngineConfig(strongly_typed=True), local=L4)
    assert ("network_flags", 1 << 1) in calls and ("builder_flags", []) in calls  # STRONGLY_TYPED is 1 in 10.x
    assert built.metadata["tensorrt_api"] == "strongly-typed" and built.metadata["strongly_typed"] is True


def test_tensorrt_8_5_build_on_xavier_uses_explicit_batch(qdq, tmp_path, monkeypatch):
    """TensorRT 8.5 is the documented API (not on PyPI): see tests/unit/test_trt_conformance.py."""
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT8_5, calls, dla_cores=2))
    eng.build_engine(qdq[1], tmp_path, "xavier-sm72-jp5.1-trt8.5", TensorRTEngineConfig(dla_core=0), local=XAVIER)
    assert ("network_flags", 1 << 0) in calls and ("builder_flags", ["FP16", "GPU_FALLBACK", "INT8"]) in calls


def test_jetson_dla_build_with_gpu_fallback(qdq, tmp_path, monkeypatch):
    calls = []
    trt = mocked_tensorrt(TRT10_JETPACK6, calls, dla_cores=2)
    install(monkeypatch, trt)
    cfg = TensorRTEngineConfig(dla_core=1)
    eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", cfg, local=ORIN)
    assert ("builder_flags", ["FP16", "GPU_FALLBACK", "INT8"]) in calls
    assert ("default_device_type", trt.DeviceType.DLA) in calls and ("DLA_core", 1) in calls


def test_dla_core_the_device_lacks_is_refused(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10_JETPACK6, [], dla_cores=0))  # an Orin Nano has no DLA
    with pytest.raises(DeviceError, match="this device has 0 DLA core"):
        eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", TensorRTEngineConfig(dla_core=0), local=ORIN)


def test_wrong_tensorrt_on_the_build_node_is_refused_with_the_way_to_the_right_one(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10, []))
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", local=ORIN)
    assert f"needs TensorRT 10.3; this node has TensorRT {TRT10}" in one_line(exc.value)
    assert "comes with JetPack 6.1" in str(exc.value)
    install(monkeypatch, mocked_tensorrt(TRT11, []))
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "hopper-sm90-trt10", local=H100)
    assert "pip install 'edgeslim[tensorrt10]'" in one_line(exc.value)


def test_same_compute_capability_before_10_9_is_refused_before_tensorrt_is_asked(qdq, tmp_path, monkeypatch):
    """Finding 1: HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY came with 10.9; 10.3 has none."""
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10_JETPACK6, calls))
    cfg = TensorRTEngineConfig(hardware_compatibility="same_compute_capability")
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert one_line(exc.value) == ("engines.hardware_compatibility: same_compute_capability needs TensorRT 10.9 "
                                   "or newer; this node has TensorRT 10.3.0")
    assert calls == []
    trt = mocked_tensorrt(TRT10, calls)
    install(monkeypatch, trt)
    eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert ("hardware_compatibility_level", trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY) in calls


def test_an_enum_member_this_tensorrt_lacks_is_one_line_not_an_attribute_error():
    trt = mocked_tensorrt(TRT11, [])
    with pytest.raises(DeviceError) as exc:
        tensorrt_calls.enum_member(trt, "BuilderFlag", "INT8")
    assert one_line(exc.value).startswith(f"TensorRT {TRT11} has no BuilderFlag.INT8")


def test_failed_build_points_at_the_log(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10, [], fail_build=True))
    with pytest.raises(DeviceError, match=r"no implementation for layer fc1; see build.log"):
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    assert "[ERROR] no implementation" in (tmp_path / eng.LOG_FILE).read_text()
    assert not (tmp_path / eng.ENGINE_FILE).exists()


def test_a_builder_tensorrt_cannot_create_is_one_line_with_the_log(qdq, tmp_path, monkeypatch):
    """Finding 3: without a usable driver the bindings raise TypeError (nullptr); it must not escape."""
    install(monkeypatch, mocked_tensorrt(TRT10, [], no_device=True))
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    msg = one_line(exc.value)
    assert msg.startswith(f"TensorRT {TRT10} could not create its builder (TypeError: {NULLPTR}")
    assert "TensorRT log: [WARNING] CUDA initialization failure with error: 35" in msg


def test_a_parser_error_is_one_line_with_the_parsers_reason(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10, [], parse_errors=["Assertion failed: scale must be positive"]))
    with pytest.raises(SourceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    msg = one_line(exc.value)
    assert msg.startswith(f"TensorRT {TRT10} cannot parse qdq.onnx: In node 1 with name: fc1")
    assert msg.endswith("Assertion failed: scale must be positive; see build.log")
    assert "[ERROR] ModelImporter.cpp" in (tmp_path / eng.LOG_FILE).read_text()


def test_engine_cache_hit_skips_the_build_and_timing_cache_is_reused(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    first = eng.build_engine(qdq[1], tmp_path / "a", "ada-sm89-trt10", local=L4, cache_dir=tmp_path / "cache")
    assert not first.cached and ("timing_cache_in", b"") in calls
    n = len(calls)
    again = eng.build_engine(qdq[1], tmp_path / "b", "ada-sm89-trt10", local=L4, cache_dir=tmp_path / "cache")
    assert again.cached and len(calls) == n and again.metadata["sha256"] == first.metadata["sha256"]
    other = eng.build_engine(qdq[1], tmp_path / "c", "ada-sm89-trt10", TensorRTEngineConfig(max_batch=8),
                             local=L4, cache_dir=tmp_path / "cache")
    assert not other.cached and ("timing_cache_in", b"+timings") in calls  # the class's timing cache
    assert other.metadata["timing_cache_reused"] is True


def test_a_timing_cache_tensorrt_refuses_is_replaced_by_an_empty_one(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    stale = tmp_path / "stale.cache"
    stale.write_bytes(b"timing cache of another GPU")
    built = eng.build_engine(qdq[1], tmp_path / "out", "ada-sm89-trt10", local=L4, timing_cache=stale)
    assert calls.index(("timing_cache_in", b"timing cache of another GPU")) < calls.index(("timing_cache_in", b""))
    log = (tmp_path / "out" / eng.LOG_FILE).read_text()
    assert "Timing cache header mismatch" in log and "does not match this TensorRT/GPU; starting empty" in log
    assert built.timing_cache_path.read_bytes() == b"+timings"


# --- the runner ---------------------------------------------------------------------------------


def test_runner_splits_batches_at_the_profile_maximum(qdq, tmp_path, monkeypatch):
    from edgeslim.components.common.onnx_runtime import make_session as qdq_session, run_batched as run_session

    trt = add_mocked_runtime(mocked_tensorrt(TRT10, []))
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", TensorRTEngineConfig(max_batch=32), local=L4)
    runner = engine_runner.EngineRunner(built.engine_path, local=L4)
    x = qdq[2].x_test[:70]
    out = runner.run(x)[OUTPUT]
    assert runner.context._batches == [32, 32, 6]
    np.testing.assert_allclose(out, run_session(qdq_session(qdq[1]), x), rtol=1e-5, atol=1e-5)
    assert runner.backend == "tensorrt:ada-sm89-trt10"


def test_runner_pads_a_fixed_batch_engine(qdq, tmp_path, monkeypatch):
    trt = add_mocked_runtime(mocked_tensorrt(TRT10, []), static_batch=4)
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    runner = engine_runner.EngineRunner(built.engine_path, local=L4)
    out = runner.run({INPUT: qdq[2].x_test[:6]})[OUTPUT]
    assert out.shape == (6, 10) and runner.context._batches == [4, 4]


def test_runner_reports_an_engine_tensorrt_cannot_load(qdq, tmp_path, monkeypatch):
    trt = add_mocked_runtime(mocked_tensorrt(TRT10, []))
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    built.engine_path.write_bytes(b"garbage")
    with pytest.raises(DeviceError, match="sha256 differs from its metadata"):
        engine_runner.EngineRunner(built.engine_path, local=L4)
    meta = dict(built.metadata, sha256=eng.file_sha256(built.engine_path))  # intact bytes, unloadable
    with pytest.raises(DeviceError, match=r"cannot deserialize .*\[ERROR\] Serialization assertion failed"):
        engine_runner.EngineRunner(built.engine_path, meta, local=L4)


@pytest.fixture
def built_engine(qdq, tmp_path, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [])))
    return eng.build_engine(qdq[1], tmp_path / "engine", "ada-sm89-trt10", local=L4)


def test_a_runtime_tensorrt_cannot_create_is_one_line(built_engine, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [], no_device=True)))
    with pytest.raises(DeviceError) as exc:
        engine_runner.EngineRunner(built_engine.engine_path, local=L4)
    assert one_line(exc.value).startswith(f"TensorRT {TRT10} could not create its runtime (TypeError: {NULLPTR}")


def test_an_engine_output_numpy_cannot_hold_is_refused_at_load(built_engine, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, []), output_dtype="BF16"))
    with pytest.raises(DeviceError) as exc:
        engine_runner.EngineRunner(built_engine.engine_path, local=L4)
    assert "tensor 'output' is DataType.BF16, which numpy cannot hold" in one_line(exc.value)


def test_a_failed_run_is_one_line_with_the_cuda_error(built_engine, qdq, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, []), fail_execute=True))
    runner = engine_runner.EngineRunner(built_engine.engine_path, local=L4)
    with pytest.raises(DeviceError) as exc:
        runner.run(qdq[2].x_test[:4])
    assert "CUDA error 700" in one_line(exc.value)


# --- the fallbacks: the edge pyfunc and the device agent's health check -----------------------------


def test_edge_pyfunc_falls_back_to_onnxruntime_and_says_so(built_engine, qdq, tmp_path, monkeypatch):
    """Finding 3: a runtime TensorRT cannot create made the pyfunc fail instead of serving the ONNX."""
    import shutil

    from edgeslim.plugins import edge_flavor as flavor

    model = tmp_path / "model"
    shutil.copytree(built_engine.engine_path.parent, model / flavor.ENGINES_DIR / "ada-sm89-trt10")
    shutil.copyfile(qdq[1], model / flavor.MODEL_FILE)
    monkeypatch.setattr(flavor, "_flavor_conf", lambda root: {})  # a bare folder: no MLmodel
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [], no_device=True)))
    m = flavor.EdgeModel(model, local=L4, tensorrt_version=TRT10)
    out = m.predict(qdq[2].x_test[:4])
    assert out["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt:ada-sm89-trt10)"
    assert out[OUTPUT].shape == (4, 10)
    assert m.choice.reason.startswith("ONNX Runtime: TensorRT engine ada-sm89-trt10 unusable: TensorRT")
    assert NULLPTR in m.choice.reason
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [])))
    assert flavor.EdgeModel(model, local=L4, tensorrt_version=TRT10).backend == "tensorrt:ada-sm89-trt10"


def test_health_check_falls_back_to_onnxruntime_and_says_so(qdq, tmp_path, monkeypatch):
    import shutil

    from edgeslim.components.common.onnx_runtime import make_session
    from edgeslim.deploy.agent import health
    from edgeslim.deploy.manifest import encode_array

    def no_device(engine_path):
        raise TypeError(NULLPTR)

    monkeypatch.setattr(health, "_tensorrt_importable", lambda: True)
    monkeypatch.setattr(health, "_tensorrt_runner", no_device)
    shutil.copyfile(qdq[1], tmp_path / "model.onnx")
    (tmp_path / "model.engine").write_bytes(b"an engine this device cannot load")
    x = qdq[2].x_test[:2]
    y = make_session(tmp_path / "model.onnx", threads=1).run(None, {INPUT: x})[0]
    res = health.run_health_check(tmp_path, {"input": encode_array(x), "outputs": {OUTPUT: encode_array(y)}})
    assert res["ok"] and res["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt)"
    assert res["fallback"] == f"TensorRT engine unusable: TypeError: {NULLPTR}"


def test_device_agent_records_why_it_serves_with_onnxruntime(tmp_path, monkeypatch):
    """The agent on a local store: the engine it built cannot be loaded (health check falls back), then a
    build that fails; release.json and the published status say ONNX Runtime serves, and why."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "deploy"))
    from fleet_unit_helpers import ManifestWriter, golden_for, make_onnx, upload

    from edgeslim.deploy.agent import health
    from edgeslim.deploy.agent.device import Agent, AgentSettings
    from edgeslim.deploy.store import LocalStore

    def fake_build(onnx_path, out_dir, device_class, config=None):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.engine").write_bytes(b"an engine this device's TensorRT cannot load")
        return types.SimpleNamespace(engine_path=Path(out_dir) / "model.engine")

    def no_device(engine_path):
        raise TypeError(NULLPTR)

    monkeypatch.setattr(tensorrt_calls, "tensorrt_available", lambda: (True, "mocked"))
    monkeypatch.setattr(eng, "build_engine", fake_build)
    monkeypatch.setattr(health, "_tensorrt_importable", lambda: True)
    monkeypatch.setattr(health, "_tensorrt_runner", no_device)
    from tests.fleet_trust import TrustKit

    kit = TrustKit(tmp_path / "keys", fleet="f")
    store = LocalStore(tmp_path / "store")
    writer = ManifestWriter(store, kit)
    agent = Agent(store=store, fleet="f", device_id="d0", device_class="cls-a", state_dir=tmp_path / "d0",
                  root=kit.root, settings=AgentSettings(poll_interval=0.01, heartbeat_interval=0.01,
                                                        health_in_process=True))
    agent.recover()
    model = make_onnx(tmp_path / "v1.onnx", seed=1)
    writer.send(upload(store, model), golden_for(model))
    assert agent.step() == "applied"
    release = json.loads((agent.state_dir / "current" / "release.json").read_text())
    assert release["backend"] == "onnxruntime"
    assert release["fallback"] == f"TensorRT engine unusable: TypeError: {NULLPTR}"
    status = json.loads((agent.state_dir / "status.json").read_text())
    assert status["current"]["fallback"] == release["fallback"]
    assert status["last"]["health"]["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt)"

    def failed_build(*a, **k):
        raise DeviceError(f"TensorRT 10.3.0 could not create its builder (TypeError: {NULLPTR})")

    monkeypatch.setattr(eng, "build_engine", failed_build)
    other = make_onnx(tmp_path / "v2.onnx", seed=2)
    writer.send(upload(store, other), golden_for(other))
    assert agent.step() == "applied"
    release = json.loads((agent.state_dir / "current" / "release.json").read_text())
    assert release["backend"] == "onnxruntime"
    assert release["fallback"].startswith("TensorRT engine build failed: TensorRT 10.3.0 could not create its builder")
