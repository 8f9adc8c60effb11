"""A mocked ``tensorrt`` module and CUDA driver for the builder's and runner's tests (there is no GPU here).

``mocked_tensorrt`` is generated from the snapshot of one real TensorRT version
(``MockedTensorRT`` in test_engine_fixtures.py; tests/unit/test_trt_conformance.py checks the
snapshots against the real bindings): its enums carry the real members and values, and every
mocked class may have only what the real class has. It records the calls the builder makes
(network flags, builder flags, profiles, timing cache, DLA) and "builds" an engine whose bytes
name the ONNX; ``add_mocked_runtime`` gives it the runtime half, whose execution context runs
that ONNX with ONNX Runtime, and ``MockedCuda`` keeps "device memory" in host buffers. It also
fails the way the real one does: a builder or runtime that cannot be created (``factory
function returned nullptr``), a parser error, a timing cache that does not fit, an engine it
cannot deserialize, ``nptype`` on BF16/FP8/INT4/FP4.
"""

from __future__ import annotations

import sys
import types

import numpy as np
from test_engine_fixtures import INPUT, OUTPUT, MockedTensorRT

from edgeslim.components.common.errors import EdgeslimError
from edgeslim.components.engine import runner as engine_runner
from edgeslim.components.engine.devices import LocalDevice

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


def install(monkeypatch, trt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engine_runner, "CudaDriver", MockedCuda)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert isinstance(exc, EdgeslimError) and msg and "\n" not in msg, msg
    return msg
