"""float32 arrays as JSON: what a release's health check carries (golden inputs, outputs, detections)."""

from __future__ import annotations

import base64
from typing import Any


class MalformedArray(ValueError):
    """An encoded array that is not what :func:`encode_array` writes."""


def encode_array(array) -> dict[str, Any]:
    """A float32 array as ``{"shape", "dtype", "b64"}`` (exact, compact, numpy-free to carry)."""
    import numpy as np

    a = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    return {"shape": list(a.shape), "dtype": "float32", "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(blob: dict[str, Any]):
    """The inverse of :func:`encode_array`.

    Raises:
        MalformedArray: not a mapping of float32 ``shape``/``b64`` that fit each other.
    """
    import numpy as np

    if not isinstance(blob, dict) or blob.get("dtype") != "float32":
        dtype = blob.get("dtype") if isinstance(blob, dict) else type(blob).__name__
        raise MalformedArray(f"golden array dtype {dtype!r}; expected float32")
    try:
        data = np.frombuffer(base64.b64decode(blob["b64"], validate=True), dtype=np.float32)
        return data.reshape(blob["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedArray(f"golden array malformed ({exc})") from None
