"""The CUDA driver through ``ctypes``: what GPU 0 is, and the memory and stream calls a runner needs.

``libcuda`` ships with every NVIDIA driver, toolkit or not, so this needs no pycuda, no CUDA
runtime and no torch: the device agent on a Jetson uses it. Where there is no driver,
:func:`load_libcuda` is ``None`` and :func:`gpu0` says so.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np

from edgeslim.components.common.errors import DeviceError

# CUDA driver API attribute ids (cuda.h: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR).
_CC_MAJOR, _CC_MINOR = 75, 76


def load_libcuda():
    """The CUDA driver library, or ``None`` where there is no NVIDIA driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def gpu0() -> Optional[tuple[str, tuple[int, int], str, int]]:
    """GPU 0 as (name, compute capability, driver CUDA version, memory MiB); ``None`` without one."""
    lib = load_libcuda()
    if lib is None or lib.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    dev = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, dev)
    major, minor, ver = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
    lib.cuDriverGetVersion(ctypes.byref(ver))
    mem = ctypes.c_size_t(0)
    total = getattr(lib, "cuDeviceTotalMem_v2", None)
    if total is not None:
        total(ctypes.byref(mem), dev)
    driver = f"{ver.value // 1000}.{(ver.value % 1000) // 10}"
    return name.value.decode(errors="replace"), (major.value, minor.value), driver, mem.value >> 20


class CudaDriver:
    """The few CUDA driver calls a runner needs: device memory, copies, one stream.

    Raises:
        DeviceError: no CUDA device here, or a driver call failed (with its error code).
    """

    def __init__(self):
        lib = load_libcuda()
        if lib is None or lib.cuInit(0) != 0:
            raise DeviceError("no CUDA device on this node; the TensorRT engine cannot run here "
                              "(the ONNX Runtime backend can)")
        u64, vp = ctypes.c_uint64, ctypes.c_void_p
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [u64]
        lib.cuMemcpyHtoD_v2.argtypes = [u64, vp, ctypes.c_size_t]
        lib.cuMemcpyDtoH_v2.argtypes = [vp, u64, ctypes.c_size_t]
        lib.cuStreamCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cuStreamSynchronize.argtypes = [vp]
        lib.cuStreamDestroy_v2.argtypes = [vp]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
        lib.cuCtxSetCurrent.argtypes = [vp]
        self.lib = lib
        ctx = vp()
        # TensorRT uses the CUDA runtime, which works in the device's primary context.
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "cuDevicePrimaryCtxRetain")
        self._check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        stream = vp()
        self._check(lib.cuStreamCreate(ctypes.byref(stream), 0), "cuStreamCreate")
        self.stream = stream

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise DeviceError(f"CUDA driver call {what} failed with error {code}")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64(0)
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), 1)), "cuMemAlloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ptr)

    def to_device(self, ptr: int, arr: np.ndarray) -> None:
        self._check(self.lib.cuMemcpyHtoD_v2(ptr, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")

    def to_host(self, arr: np.ndarray, ptr: int) -> None:
        self._check(self.lib.cuMemcpyDtoH_v2(arr.ctypes.data, ptr, arr.nbytes), "cuMemcpyDtoH")

    def sync(self) -> None:
        self._check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def close(self) -> None:
        if self.stream:
            self.lib.cuStreamDestroy_v2(self.stream)
            self.stream = None
