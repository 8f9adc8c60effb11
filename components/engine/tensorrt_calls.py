"""How the builder and the runner call TensorRT: imported lazily, its log kept, its failures one line.

``tensorrt`` is imported inside :func:`import_tensorrt` and :func:`tensorrt_available` only, so
that every module of the engine works where TensorRT is missing. Whatever the bindings raise or
log on the way (a builder or runtime they cannot create, an enum member this version lacks)
becomes one ``DeviceError`` line that carries the last error lines of TensorRT's log, so callers
fall back to ONNX Runtime.
"""

from __future__ import annotations

from typing import Optional

from edgeslim.components.common.errors import DeviceError, EdgeslimError, MissingDependencyError
from edgeslim.components.engine.devices import DeviceClass, get_device_class, tensorrt_install_hint


def _class_or_none(device_class: Optional[str]) -> Optional[DeviceClass]:
    try:
        return get_device_class(device_class) if device_class else None
    except DeviceError:
        return None


def tensorrt_available(device_class: Optional[str] = None) -> tuple[bool, str]:
    """Whether ``import tensorrt`` works here, and a line saying why (not).

    Importing it loads its (large) libraries but needs no GPU. The hint names
    the extra (or JetPack) of ``device_class``, or of every class without one.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        return False, (f"tensorrt cannot be imported ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                       f"{tensorrt_install_hint(_class_or_none(device_class))}")
    return True, f"tensorrt {trt.__version__}"


def import_tensorrt(why: str, device_class: Optional[str] = None):
    """``import tensorrt``, or ``MissingDependencyError`` with the install hint of ``device_class``."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        exc = MissingDependencyError("tensorrt", None, why)
        exc.msg = f"tensorrt is not installed: {why}; {tensorrt_install_hint(_class_or_none(device_class))}"
        exc.args = (exc.msg,)  # ImportError prints .msg, the rest .args
        raise exc from None
    return trt


def collecting_logger(trt, lines: list[str]):
    """A TensorRT logger that keeps every message (the build log, or why a load failed)."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            lines.append(f"[{getattr(severity, 'name', severity)}] {' '.join(str(msg).split())}")

    return _Logger()


# What the bindings raise: pybind11 turns a null object into TypeError ("factory function returned
# nullptr": no usable GPU, driver or CUDA for this TensorRT), C++ exceptions into RuntimeError & co.
TENSORRT_FAILURES = (TypeError, RuntimeError, ValueError, IndexError, MemoryError)


def log_problems(lines: list[str], n: int = 2) -> str:
    """The last ``n`` error lines of a TensorRT log (warnings when it logged no error), on one line."""
    errors = [ln for ln in lines if ln.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
    picked = errors or [ln for ln in lines if ln.startswith("[WARNING]")]
    return " | ".join(picked[-n:]) if picked else "TensorRT logged no error"


class Steps:
    """Names the TensorRT call under way; whatever the bindings raise there becomes one ``DeviceError``
    line: the step, the exception, and the last error lines of the TensorRT log."""

    def __init__(self, version: str, lines: list[str]):
        self.version, self.lines, self.now = version, lines, "start"

    def __call__(self, what: str) -> None:
        self.now = what

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, tp, exc, tb) -> bool:
        if isinstance(exc, TENSORRT_FAILURES) and not isinstance(exc, EdgeslimError):
            said = " ".join(str(exc).split()) or "no message"
            why = "; no usable GPU, driver or CUDA for this TensorRT here" if "returned nullptr" in said else ""
            raise DeviceError(f"TensorRT {self.version} could not {self.now} ({type(exc).__name__}: {said}){why}; "
                              f"TensorRT log: {log_problems(self.lines)}") from None
        return False


def enum_member(trt, enum: str, name: str):
    """``trt.<enum>.<name>``, or a one-line ``DeviceError`` when this TensorRT has no such member."""
    try:
        return getattr(getattr(trt, enum), name)
    except AttributeError:
        raise DeviceError(f"TensorRT {trt.__version__} has no {enum}.{name}; build on a node whose TensorRT "
                          "matches the device class") from None
