"""A prediction request, as the CLIs deliver it, turned into the model's input tensors.

``mlflow deployments predict --input-path FILE`` reads FILE with ``pandas.read_json`` and hands the
target a DataFrame; ``edgeslim fleet predict --input FILE`` hands it the parsed JSON. Both accept:

- ``{"inputs": [sample, ...]}`` (MLflow's tensor format; ``"instances"`` too), each sample shaped as
  the model's input without the batch axis, e.g. ``(1, 8, 8)``; ``{"inputs": {"x": [...], ...}}`` for
  a model with several inputs;
- a bare JSON list of samples, nested the same way;
- rows of flat numbers, one row per sample (what a DataFrame holds): reshaped to the model's input
  shape when the signature fixes it and the count matches;
- raw images for a model that records ``data.preprocess``: ``{"inputs": {"images": [base64, ...]}}``
  (or ``{"images": [...]}``), or an ``image`` column of base64 text; they go to the model as
  ``{"images": [...]}``, which preprocesses them.

The model's tensor inputs (:func:`tensor_inputs`: its signature's, or, for a model that takes raw
images, those its metadata records) give the input names, dtypes and shapes; without them, the arrays
go to the model as float32, unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgeslim.components.common.errors import SourceError

_WRAPPERS = ("inputs", "instances")


def _specs(schema) -> list[tuple[str | None, np.dtype, tuple[int, ...] | None]]:
    """(name, dtype, shape) per input of a tensor signature; [] without one."""
    if schema is None or not getattr(schema, "is_tensor_spec", lambda: False)():
        return []
    return [(spec.name, np.dtype(spec.type), tuple(spec.shape) if spec.shape is not None else None)
            for spec in schema.inputs]


def _stacked(cells, what: str) -> np.ndarray:
    try:
        return np.asarray([np.asarray(c, dtype=np.float64) for c in cells])
    except (TypeError, ValueError) as exc:
        raise SourceError(f"predict: {what}: the samples are not arrays of numbers of one shape ({exc})") from None


def _unwrap_frame(df) -> Any:
    """A DataFrame from ``pandas.read_json``: rows of flat numbers, a bare list of samples (numbered
    columns of list cells), a column of samples (``inputs``), named inputs in one (the index holds
    the names) or in columns of their own."""
    columns = [str(c) for c in df.columns]
    has_lists = len(df) and all(isinstance(v, (list, tuple, np.ndarray)) for v in df.iloc[0].tolist())
    if not has_lists:
        try:
            return df.to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SourceError(f"predict: the rows are not all numbers ({exc}); send {{\"inputs\": [sample, ...]}} "
                              "with each sample a nested list of numbers") from None
    if all(isinstance(c, (int, np.integer)) for c in df.columns):
        # A bare list of samples: pandas made each sample's first axis the columns; put it back.
        return _stacked([list(row) for row in df.itertuples(index=False)], "the samples")
    if len(columns) == 1 and all(isinstance(i, str) for i in df.index):
        # {"inputs": {"x": [...], ...}}: pandas made the input names the index.
        return {str(i): df.iloc[k, 0] for k, i in enumerate(df.index)}
    if len(columns) == 1:  # {"inputs": [...]}, {"instances": [...]} or {"x": [...]}
        return _stacked(df.iloc[:, 0].tolist(), columns[0])
    return {c: _stacked(df[col].tolist(), c) for c, col in zip(columns, df.columns)}


def tensor_inputs(model_meta):
    """The tensor input schema of a logged edge model (``mlflow.models.Model``): its signature's, or,
    for a model that also takes raw images (logged with an output-only signature), the
    ``tensor_inputs`` its metadata records; None when neither is there."""
    schema = model_meta.get_input_schema()
    recorded = (model_meta.metadata or {}).get("tensor_inputs")
    if schema is None and recorded:
        import json

        from mlflow.types.schema import Schema

        schema = Schema.from_json(json.dumps(recorded))
    return schema


def model_input(data: Any, schema=None) -> Any:
    """``data`` as the model's input: one float array (a model with one input) or ``{name: array}``.

    Raises:
        SourceError: the request cannot be the model's input (one line: what was sent, what it takes).
    """
    if hasattr(data, "iloc") and hasattr(data, "columns"):  # a pandas DataFrame
        column = next((c for c in ("images", "image") if c in data.columns), None)
        if column is not None:
            return {"images": data[column].tolist()}
        data = _unwrap_frame(data)
    if isinstance(data, dict):
        wrapped = [k for k in _WRAPPERS if k in data]
        if wrapped and len(data) == 1:
            data = data[wrapped[0]]
    if isinstance(data, dict) and ("images" in data or "image" in data):
        return {"images": list(data["images"] if "images" in data else data["image"])}
    specs = _specs(schema)
    names = [n for n, _, _ in specs if n]
    if isinstance(data, dict):
        if names and len(specs) == 1 and list(data) == [names[0]]:
            data = data[names[0]]
        elif names:
            missing = [n for n in names if n not in data]
            if missing:
                raise SourceError(f"predict: input {missing[0]!r} is missing; the model's inputs: {', '.join(names)}; "
                                  f"got {', '.join(map(str, data)) or 'none'}")
            return {n: _fit(data[n], n, dt, shape) for n, dt, shape in specs}
        else:
            return {str(k): _fit(v, str(k), np.dtype(np.float32), None) for k, v in data.items()}
    if len(specs) > 1:
        raise SourceError(f"predict: the model has {len(specs)} inputs ({', '.join(names)}): send "
                          "{\"inputs\": {NAME: [sample, ...], ...}}")
    name, dtype, shape = specs[0] if specs else (None, np.dtype(np.float32), None)
    x = _fit(data, name or "input", dtype, shape)
    return {name: x} if name else x


def _fit(value: Any, name: str, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.ndarray:
    """One input: cast to ``dtype``; rows of flat numbers reshaped to ``shape`` when it is fixed."""
    try:
        x = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"predict: input {name!r} is not an array of numbers of one shape ({exc})") from None
    if shape is None or len(shape) < 2 or x.ndim == len(shape):
        return x.astype(dtype if dtype.kind in "fiub" else np.float32)
    sample = shape[1:]
    per = math.prod(sample) if all(d > 0 for d in sample) else None
    if x.ndim == 2 and per is not None and x.shape[1] == per:
        return x.reshape((x.shape[0], *sample)).astype(dtype)
    want = "x".join(str(d) if d > 0 else "?" for d in sample)
    raise SourceError(f"predict: input {name!r} got shape {tuple(x.shape)}; the model takes samples of shape "
                      f"({want}) after the batch axis: send {{\"inputs\": [sample, ...]}} with each sample nested as "
                      f"({want})" + (f", or rows of {per} numbers" if per else ""))
