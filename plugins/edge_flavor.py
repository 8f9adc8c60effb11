"""The ``edgeslim_edge`` MLflow flavor: a Q/DQ ONNX (plus engines) that runs anywhere.

Like MLflow's own flavors: module-level ``save_model``, ``log_model``,
``load_model`` and ``_load_pyfunc``; heavy runtimes are imported inside
functions. ``mlflow.pyfunc.load_model(uri).predict(batch)`` returns a dict
with one array per model output and ``backend``, the runtime that ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FLAVOR_NAME = "edgeslim_edge"
MODEL_FILE = "model.onnx"
META_FILE = "edge_meta.json"


def save_model(path: str | Path, onnx_path: str | Path, *, metadata: dict[str, Any] | None = None,
               mlflow_model=None, signature=None, input_example=None) -> Path:
    """Write the edge model directory at ``path``.

    Args:
        path: a new directory.
        onnx_path: the int8 Q/DQ ONNX.
        metadata: free-form facts stored beside the model (recipe hash, metrics, ...).
    """
    import mlflow
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    import edgeslim

    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(onnx_path, path / MODEL_FILE)
    (path / META_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True, default=str))
    model = mlflow_model or Model()
    if signature is not None:
        model.signature = signature
    if input_example is not None:
        from mlflow.models.utils import _save_example

        _save_example(model, input_example, str(path))
    import onnxruntime

    model.add_flavor(FLAVOR_NAME, model_file=MODEL_FILE, meta_file=META_FILE,
                     edgeslim_version=edgeslim.__version__,
                     onnxruntime_version=onnxruntime.__version__)
    add_to_model(model, loader_module="edgeslim.plugins.edge_flavor", data=".",
                 python_env=None)
    model.save(str(path / "MLmodel"))
    del mlflow
    return path


def log_model(onnx_path: str | Path, name: str = "model", *, metadata: dict[str, Any] | None = None,
              signature=None, input_example=None, params: dict | None = None, tags: dict | None = None):
    """Log the edge model to the active run; returns MLflow's ``ModelInfo``."""
    from mlflow.models import Model

    import edgeslim.plugins.edge_flavor as flavor

    return Model.log(artifact_path=name, flavor=flavor, onnx_path=onnx_path, metadata=metadata,
                     signature=signature, input_example=input_example, params=params, tags=tags)


class EdgeModel:
    """The loaded edge model; ``predict`` says which backend ran."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = json.loads((self.path / META_FILE).read_text()) if (self.path / META_FILE).exists() else {}
        opts = ort.SessionOptions()
        # Q/DQ semantics: see DESIGN.md, the fused CPU int8 kernels can saturate.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(str(self.path / MODEL_FILE), opts,
                                            providers=["CPUExecutionProvider"])
        self.backend = "onnxruntime:CPUExecutionProvider"

    def predict(self, data, params=None) -> dict[str, Any]:
        x = np.asarray(data.values if hasattr(data, "values") else data, dtype=np.float32)
        inp = self.session.get_inputs()[0]
        outs = self.session.run(None, {inp.name: x})
        result = {o.name: v for o, v in zip(self.session.get_outputs(), outs)}
        result["backend"] = self.backend
        return result


def load_model(model_uri: str) -> EdgeModel:
    """Load an edge model from any MLflow URI."""
    from mlflow.artifacts import download_artifacts

    return EdgeModel(download_artifacts(model_uri))


def _load_pyfunc(path: str) -> EdgeModel:
    return EdgeModel(path)
