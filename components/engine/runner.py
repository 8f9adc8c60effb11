"""Runs a TensorRT engine the builder wrote: deserialized once, batches through it on GPU 0.

Imports no torch, mlflow or kfp: the device agent and the ``edge`` pyfunc run engines with it.
``tensorrt`` is imported when a runner is made, and device memory goes through the CUDA driver
(``cuda``), so nothing here needs pycuda or the CUDA toolkit. An engine from another TensorRT
version or GPU architecture is refused in one line before TensorRT is asked to load it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeslim.components.common.errors import DeviceError
from edgeslim.components.engine.builder import ENGINE_FILE, check_engine_compatible, read_metadata
from edgeslim.components.engine.cuda import CudaDriver
from edgeslim.components.engine.devices import LocalDevice, detect_local_device
from edgeslim.components.engine.tensorrt_calls import (Steps, collecting_logger, enum_member, import_tensorrt,
                                                       log_problems)


class EngineRunner:
    """Deserializes an engine and runs batches through it.

    Refuses, in one line, an engine from another TensorRT version or GPU
    architecture before TensorRT is asked to load it.
    """

    def __init__(self, engine_path: str | Path, metadata: Optional[dict[str, Any]] = None,
                 local: Optional[LocalDevice] = None):
        path = Path(engine_path)
        self.engine_path = path / ENGINE_FILE if path.is_dir() else path
        if not self.engine_path.is_file():
            raise DeviceError(f"engine {self.engine_path}: no such file")
        self.metadata = metadata if metadata is not None else read_metadata(self.engine_path)
        blob = self.engine_path.read_bytes()
        if self.metadata.get("sha256") and hashlib.sha256(blob).hexdigest() != self.metadata["sha256"]:
            raise DeviceError(f"engine {self.engine_path}: its sha256 differs from its metadata; "
                              "download it again or rebuild it from the Q/DQ ONNX")
        trt = import_tensorrt("running a TensorRT engine", self.metadata.get("device_class"))
        self.trt = trt
        version = str(trt.__version__)
        check_engine_compatible(self.metadata, version, local or detect_local_device())
        self.cuda = CudaDriver()
        self.log: list[str] = []
        try:
            self._load(trt, version, blob)
        except BaseException:
            self.cuda.close()
            raise
        self.backend = f"tensorrt:{self.metadata.get('device_class', '?')}"

    def _load(self, trt, version: str, blob: bytes) -> None:
        with Steps(version, self.log) as step:
            step("create its runtime")
            self._logger = collecting_logger(trt, self.log)
            self.runtime = trt.Runtime(self._logger)
            if self.metadata.get("version_compatible"):
                # A version-compatible engine carries its own lean runtime, which is host code.
                self.runtime.engine_host_code_allowed = True
            step(f"deserialize {self.engine_path.name}")
            self.engine = self.runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise DeviceError(f"TensorRT {version} cannot deserialize {self.engine_path}: "
                                  f"{log_problems(self.log)}; rebuild it here from the Q/DQ ONNX")
            step("create an execution context")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise DeviceError(f"TensorRT {version} could not create an execution context for "
                                  f"{self.engine_path.name}: {log_problems(self.log)}")
            step("read the engine's inputs and outputs")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            is_input = enum_member(trt, "TensorIOMode", "INPUT")
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == is_input]
            self.outputs = [n for n in names if n not in self.inputs]
            self.dtypes = {}
            for n in names:
                dtype = self.engine.get_tensor_dtype(n)
                try:
                    self.dtypes[n] = np.dtype(trt.nptype(dtype))
                except TypeError:  # BF16, FP8, INT4, FP4: numpy has no such type
                    raise DeviceError(f"engine {self.engine_path.name}: tensor {n!r} is {dtype}, which numpy "
                                      "cannot hold; export the model with float32/float16/int8 inputs and "
                                      "outputs") from None

    def _batch_limit(self, name: str) -> tuple[int, bool]:
        prof = (self.metadata.get("profiles") or {}).get(name)
        static = int(self.engine.get_tensor_shape(name)[0])
        if static > 0:
            return static, True
        return int(prof["max"][0]) if prof else 1, False

    def run(self, feeds: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch; a batch larger than the profile's maximum is split.

        Args:
            feeds: one array per input name, or one array for a single-input engine.

        Returns:
            One array per output name.
        """
        if not isinstance(feeds, dict):
            feeds = {self.inputs[0]: feeds}
        feeds = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.inputs}
        total = len(next(iter(feeds.values())))
        limit, static = self._batch_limit(self.inputs[0])
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.outputs}
        for start in range(0, total, limit):
            chunk = {n: a[start:start + limit] for n, a in feeds.items()}
            real = len(next(iter(chunk.values())))
            if static and real < limit:  # a fixed-batch engine: pad, then drop the padding
                chunk = {n: np.concatenate([a, np.zeros((limit - real, *a.shape[1:]), a.dtype)])
                         for n, a in chunk.items()}
            for n, out in self._run_once(chunk).items():
                parts[n].append(out[:real])
        return {n: np.concatenate(v) for n, v in parts.items()}

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ptrs = []
        try:
            for n, a in feeds.items():
                self.context.set_input_shape(n, a.shape)
                ptr = self.cuda.alloc(a.nbytes)
                ptrs.append(ptr)
                self.cuda.to_device(ptr, a)
                self.context.set_tensor_address(n, ptr)
            outs = {}
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                arr = np.empty(shape, dtype=self.dtypes[n])
                ptr = self.cuda.alloc(arr.nbytes)
                ptrs.append(ptr)
                self.context.set_tensor_address(n, ptr)
                outs[n] = (arr, ptr)
            with Steps(str(self.trt.__version__), self.log) as step:
                step(f"run {self.engine_path.name}")
                if not self.context.execute_async_v3(self.cuda.stream.value):
                    raise DeviceError(f"TensorRT could not run {self.engine_path.name}: {log_problems(self.log)}")
            self.cuda.sync()
            for arr, ptr in outs.values():
                self.cuda.to_host(arr, ptr)
            return {n: arr for n, (arr, _) in outs.items()}
        finally:
            for p in ptrs:
                self.cuda.free(p)

    def close(self) -> None:
        self.context = self.engine = None
        self.cuda.close()
