"""register: a gated candidate goes back into the MLflow registry, with its lineage.

Idempotent: a version made from the same parent version and recipe is found
by its tags and reused. If anything fails after the version was created, the
version is deleted again: nothing half-made stays registered.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.components.common.version import __version__

from edgeslim.components.common.errors import GateRejected
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.tracking import connect

log = logging.getLogger(__name__)
TAG = "edgeslim."


def find_existing(client, name: str, parent_version: str, parent_name: str, recipe_hash: str):
    """A version of ``name`` already made from this parent version and recipe, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for mv in versions:
        t = mv.tags or {}
        if (t.get(TAG + "parent_name") == parent_name and t.get(TAG + "parent_version") == parent_version
                and t.get(TAG + "recipe_hash") == recipe_hash):
            return mv
    return None


def _engines_to_ship(engines) -> dict[str, str]:
    """Device class -> engine folder (built) or status line (not built)."""
    from edgeslim.components.engine.stage import STATUS_BUILT

    out: dict[str, str] = {}
    for e in engines:
        key, status = e["device_class"], e["status"]
        if status != STATUS_BUILT:
            out[key] = status
            continue
        folder = Path(e.get("path", "")) / key
        if not folder.is_dir():  # on a cluster the artifact lives in the pipeline root
            import mlflow

            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{e['uri'].rstrip('/')}/{key}"))
        out[key] = str(folder)
    return out


def _flat_metrics(evaluation: dict[str, Any], level: float | None = None) -> dict[str, float]:
    """The evaluation's figures as flat MLflow metrics: the task metric, every fidelity figure the task's
    evaluation measured (agreement, SQNR, ...), size, MACs and parameters (one sample's forward pass, as
    the exports counted them), latency, and each gated drop's interval on the test split at ``level`` (the
    gate's confidence; 95% where it sets none) as ``<drop>_low`` and ``<drop>_high``."""
    from edgeslim.components.common.confidence import REPORT_LEVEL, interval

    src, cand = evaluation["source"], evaluation["candidate"]
    out = {
        "source_metric": src["metric"], "candidate_metric": cand["metric"],
        "metric_drop": round(src["metric"] - cand["metric"], 4),
        **(cand.get("fidelity") or {}),
        "source_size_bytes": src["size_bytes"], "candidate_size_bytes": cand["size_bytes"],
        "size_ratio": cand.get("size_ratio", 0.0),
        "source_macs": src.get("macs"), "candidate_macs": cand.get("macs"),
        "source_params": src.get("params"), "candidate_params": cand.get("params"),
        # ORT's fused int8 CPU kernels on a sample of the test images, and the Q/DQ figure on the same images
        **{k: cand.get(k) for k in ("cpu_int8_kernel_metric", "cpu_int8_kernel_qdq_metric", "cpu_int8_kernel_samples")},
    }
    for who, sec in (("source", src), ("candidate", cand)):
        for b, ms in sec.get("latency_ms", {}).items():
            out[f"{who}_latency_ms_{b}"] = ms
    for name, stat in (evaluation.get("confidence") or {}).items():
        iv = interval(stat, level or REPORT_LEVEL)
        out[f"{name}_low"], out[f"{name}_high"] = iv["low"], iv["high"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def onnx_signature(onnx_path: str | Path, *, images: bool = False):
    """The MLflow model signature of an ONNX model: one tensor spec per graph input and output, a
    dynamic dimension as -1 (what the edge pyfunc takes and what its arrays are).

    With ``images`` (the model records ``data.preprocess``, so its pyfunc also takes
    ``{"images": [...]}`` or an ``image`` column), the signature holds the outputs only: an MLflow
    input schema is either tensors or columns, so any input schema would make MLflow refuse one of
    the two forms before the model sees it. The edge pyfunc checks its inputs itself then, and
    :func:`register` records the tensor specs in the model's metadata as ``tensor_inputs``.
    """
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(dtype, shape, v.name)

    inputs = Schema([spec(v) for v in graph.input if v.name not in inits])
    return ModelSignature(inputs=None if images else inputs, outputs=Schema([spec(v) for v in graph.output]))


def edge_requirements(images: bool = False) -> list[str]:
    """What the edge pyfunc imports to serve the model (ONNX Runtime; TensorRT is the device's own),
    pinned to the versions that built and checked it; Pillow too when it takes raw ``images``."""
    import onnxruntime

    reqs = [f"edgeslim=={__version__}", f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"]
    if images:
        import PIL

        reqs.append(f"pillow=={PIL.__version__}")
    return reqs


class _EdgeFlavorWithEnv:
    """``edge_model``'s flavor for ``Model.log``, plus the environment files MLflow serves a model with:
    ``requirements.txt``, ``python_env.yaml`` and ``conda.yaml`` from ``pip_requirements``, named in the
    MLmodel's ``python_function`` section (``mlflow models serve``, ``--env-manager`` read them)."""

    __name__ = "edgeslim.components.edge_model"  # the flavor module MLflow records

    def __init__(self, pip_requirements: list[str]):
        self.pip_requirements = pip_requirements

    def save_model(self, path, mlflow_model=None, **kwargs):
        import os

        import yaml
        from mlflow.models import Model
        from mlflow.pyfunc import ENV, FLAVOR_NAME as PYFUNC
        from mlflow.utils.environment import (_CONDA_ENV_FILE_NAME, _CONSTRAINTS_FILE_NAME, _PYTHON_ENV_FILE_NAME,
                                              _REQUIREMENTS_FILE_NAME, _process_pip_requirements, _PythonEnv)

        from edgeslim.components import edge_model

        mlflow_model = mlflow_model or Model()
        out = edge_model.save_model(path, mlflow_model=mlflow_model, **kwargs)
        conda_env, reqs, constraints = _process_pip_requirements(None, list(self.pip_requirements))
        with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
            yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
        if constraints:
            Path(path, _CONSTRAINTS_FILE_NAME).write_text("\n".join(constraints))
        Path(path, _REQUIREMENTS_FILE_NAME).write_text("\n".join(reqs))
        _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
        mlflow_model.flavors[PYFUNC][ENV] = {"conda": _CONDA_ENV_FILE_NAME, "virtualenv": _PYTHON_ENV_FILE_NAME}
        mlflow_model.save(os.path.join(path, "MLmodel"))
        return out


def version_description(*, parent: dict[str, Any], recipe_hash: str, gate_result: dict[str, Any],
                        evaluation: dict[str, Any], metric_label: str = "metric") -> str:
    """The model version's description: where it came from, the gate's verdict, what changed
    (``metric_label``: the task metric, as the task names it)."""
    src, cand = evaluation["source"], evaluation["candidate"]
    name = metric_label
    fid = cand.get("fidelity") or {}
    sqnr = fid.get("quantization_sqnr_db", fid.get("sqnr_db"))
    return (
        f"int8 Q/DQ ONNX (edgeslim {__version__}) of models:/{parent['name']}/{parent['version']}, "
        f"recipe {recipe_hash}.\n\n"
        f"Gate: {'passed' if gate_result.get('passed') else 'failed'}, {gate_result.get('summary', '')}\n\n"
        f"{name} on the test split: {src['metric']:.2f}% -> {cand['metric']:.2f}% "
        f"({cand['metric'] - src['metric']:+.2f} pt); size {src['size_bytes']:,} B -> {cand['size_bytes']:,} B "
        f"({src['size_bytes'] / max(cand['size_bytes'], 1):.1f}x smaller)"
        + (f"; output SQNR {sqnr:.1f} dB against its fp32 model" if isinstance(sqnr, (int, float)) else "")
        + ".")[:4900]


def register(candidate_onnx: str | Path, *, parent: dict[str, Any], recipe, evaluation: dict[str, Any],
             gate_result: dict[str, Any], calibration: np.ndarray, data_description: dict[str, Any],
             artifacts: list[str | Path] = (), tracking_uri: str | None = None,
             engines: list[dict[str, str]] = (), calibration_lineage: dict[str, Any] | None = None) -> StageResult:
    """Register a candidate that passed its gate.

    Args:
        candidate_onnx: the int8 Q/DQ ONNX.
        parent: ``pull``'s lineage (name, version, run_id, model_id).
        recipe: the validated ``Recipe``.
        evaluation: ``evaluate``'s metrics.
        gate_result: ``gate``'s verdict; a failed one is refused.
        calibration: calibration samples: the rows MLflow profiles for the calibration dataset input and
            the model's input example (a few rows: :meth:`~edgeslim.components.common.data.Splits.calibration_profile`).
        calibration_lineage: what ``calibration`` stands for: ``samples`` (how many calibrated),
            ``profiled_rows``, ``digest`` (of every calibration row); without it, ``calibration`` is the
            whole calibration set.
        data_description: the provider and its arguments.
        artifacts: more files logged with the run (report.json, the HTML report).
        tracking_uri: the MLflow server.
        engines: the engine tasks' results ``{device_class, status, path, uri}``;
            built engines ship inside the edge model, the others as status lines.

    Returns:
        ``StageResult`` whose metrics are ``{name, version, alias, run_id, model_id, reused}``.

    Raises:
        GateRejected: ``gate_result`` did not pass.
    """
    import mlflow
    from mlflow.entities import LoggedModelInput
    from mlflow.models import Model

    from edgeslim.components import edge_model
    from edgeslim.components.common.tasks import task_for
    from edgeslim.deploy import release

    if not gate_result.get("passed"):
        raise GateRejected(f"not registering a candidate that failed its gate ({gate_result.get('summary')})")
    t0 = time.perf_counter()
    client = connect(tracking_uri)
    name = recipe.register.model_name(parent["name"])
    alias = recipe.register.alias
    recipe_hash = recipe.digest()
    existing = find_existing(client, name, parent["version"], parent["name"], recipe_hash)
    if existing is not None:
        client.set_registered_model_alias(name, alias, existing.version)
        log.info("reusing %s version %s (same parent version and recipe)", name, existing.version)
        return StageResult(model=None, metrics={
            "name": name, "version": str(existing.version), "alias": alias, "run_id": existing.run_id,
            "model_id": existing.tags.get(TAG + "model_id", ""), "reused": True,
            "engines": {k[len(TAG + "engine."):]: v for k, v in (existing.tags or {}).items()
                        if k.startswith(TAG + "engine.")},
        }, seconds=time.perf_counter() - t0)

    flat = _flat_metrics(evaluation, getattr(recipe.applied_gate, "confidence", None))
    tags = {
        TAG + "parent_name": parent["name"], TAG + "parent_version": parent["version"],
        TAG + "parent_run_id": parent.get("run_id", ""), TAG + "parent_model_id": parent.get("model_id", ""),
        TAG + "parent_uri": parent.get("uri", ""), TAG + "recipe_hash": recipe_hash,
        TAG + "version": __version__, TAG + "gate": gate_result["summary"][:4000],
        **{TAG + "metric." + k: str(v) for k, v in flat.items()},
    }
    mlflow.set_experiment(recipe.register.experiment)
    mv = None
    with mlflow.start_run(run_name=f"edge {parent['name']} v{parent['version']}") as run:
        try:
            mlflow.log_params({
                "source": recipe.source, "recipe_hash": recipe_hash,
                "stages": ",".join(f"{s.stage}:{s.method}" for s in recipe.stages),
                **{f"quantize.{k}": v for k, v in recipe.quantize.to_dict().items() if not isinstance(v, (dict, list))},
                **{f"gate.{k}": v for k, v in recipe.applied_gate.to_dict().items()},
                "data.provider": recipe.data.provider,
            })
            mlflow.log_dict(recipe.to_dict(), "recipe.json")
            mlflow.log_metrics(flat)
            if parent.get("model_id"):
                mlflow.log_input(model=LoggedModelInput(parent["model_id"]))
            calib = {"samples": len(calibration), "profiled_rows": len(calibration), **(calibration_lineage or {})}
            # The dataset's digest is of every calibration row; its profile and schema are of the rows given.
            calib_ds = mlflow.data.from_numpy(
                calibration, source=str(data_description.get("path") or data_description.get("provider")),
                name=f"calibration-{data_description.get('provider', 'data')}",
                digest=str(calib["digest"])[:32] if calib.get("digest") else None)
            input_tags = {"split": "train", "samples": str(calib["samples"])}
            if calib["profiled_rows"] != calib["samples"]:
                input_tags["profile"] = (f"profile and schema of the first {calib['profiled_rows']} of the "
                                   f"{calib['samples']} calibration samples")
            mlflow.log_input(calib_ds, context="calibration", tags=input_tags)
            for a in artifacts:
                if Path(a).exists():
                    mlflow.log_artifact(str(a))
            shipped = _engines_to_ship(engines)
            tags.update(edge_model.engine_status_tags({k: v if isinstance(v, str) and not Path(v).exists()
                                                        else "built and verified" for k, v in shipped.items()}))
            metadata = {"parent": parent, "recipe_hash": recipe_hash, "gate": gate_result, "metrics": flat,
                        # a detector's edge pyfunc decodes its outputs with this
                        "task": task_for(recipe.task).metadata(),
                        # how an image becomes the model's input (resize, crop, mean/std, ...)
                        **({"preprocess": recipe.data.preprocess.to_dict(),
                            # the signature leaves the input out (raw images go in too); these are its tensors
                            "tensor_inputs": onnx_signature(candidate_onnx).inputs.to_dict()}
                           if recipe.data.preprocess else {})}
            # edge_model.log_model, plus the signature (the ONNX's tensors) and the environment files.
            info = Model.log(
                artifact_path=None, name="model",
                flavor=_EdgeFlavorWithEnv(edge_requirements(images=recipe.data.preprocess is not None)),
                onnx_path=candidate_onnx, metadata=metadata, edge_metadata=metadata, engines=shipped or None,
                signature=onnx_signature(candidate_onnx, images=recipe.data.preprocess is not None),
                input_example=np.ascontiguousarray(calibration[:2]),
                tags=edge_model.engine_status_tags({k: v if isinstance(v, str) and not Path(v).exists()
                                                    else "built and verified" for k, v in shipped.items()}) or None,
            )
            model_id = getattr(info, "model_id", None) or ""
            if model_id:
                mlflow.set_logged_model_tags(model_id, tags)
            model_uri = f"models:/{model_id}" if model_id else info.model_uri
            mv = mlflow.register_model(model_uri, name, tags={**tags, TAG + "model_id": model_id})
            client.update_model_version(name, mv.version, description=version_description(
                parent=parent, recipe_hash=recipe_hash, gate_result=gate_result, evaluation=evaluation,
                metric_label=task_for(recipe.task).metric_label))
            client.set_registered_model_alias(name, alias, mv.version)
            client.set_registered_model_tag(name, TAG + "parent_name", parent["name"])
            # The release key signs what passed the gate (fleets install nothing else).
            release.sign_if_configured(name, str(mv.version), client=client)
        except BaseException:
            if mv is not None:  # nothing half-made stays registered
                try:
                    client.delete_model_version(name, mv.version)
                except Exception:  # best effort: the original error matters more
                    log.warning("could not delete half-registered %s version %s", name, mv.version)
            raise
    return StageResult(model=None, metrics={
        "name": name, "version": str(mv.version), "alias": alias, "run_id": run.info.run_id,
        "model_id": model_id, "reused": False,
        "engines": {k: v if isinstance(v, str) and not Path(v).exists() else "built and verified"
                    for k, v in shipped.items()},
    }, lineage=tags, seconds=time.perf_counter() - t0)
