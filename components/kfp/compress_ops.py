"""Thin Kubeflow components around the compression stages (distill, prune, QAT,
sensitivity, accuracy-aware quantization), one per stage.

Each takes its stage config as JSON (``config.to_dict()``), the data section of
a recipe as JSON, and model artifacts; it calls the stage function and writes
the outputs. Built by :func:`make_compress_ops` so the base image is a
parameter; ``kfp.local.SubprocessRunner(use_venv=False)`` runs them on a laptop.
"""


from types import SimpleNamespace  # noqa: I001  (no __future__ annotations: KFP reads them)

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

DEFAULT_IMAGE = "ghcr.io/edgeslim/edgeslim:0.1.0"


def distill_op(config_json: str, data_json: str, model: Input[Model], teacher: Input[Model],
               student: Output[Model], info: Output[Artifact]):
    """Distil ``teacher`` into a student (from ``model``, a width multiplier or a registered URI)."""
    import json
    from pathlib import Path

    from edgeslim.components.common.model_io import load_module, save_module
    from edgeslim.components.transform.stages import data_from_json, stage_config_from_json
    from edgeslim.components.transform.distill import distill

    res = distill(load_module(model.path), stage_config_from_json("distill", config_json),
                  data=data_from_json(data_json), teacher=load_module(teacher.path))
    save_module(res.model, student.path)
    Path(info.path).write_text(json.dumps({**res.metrics, "lineage": res.lineage, "seconds": res.seconds}))


def prune_op(config_json: str, data_json: str, model: Input[Model], pruned: Output[Model],
             info: Output[Artifact]):
    """Structurally prune ``model`` to the configured share of its MACs or parameters."""
    import json
    from pathlib import Path

    from edgeslim.components.common.model_io import load_module, save_module
    from edgeslim.components.transform.stages import data_from_json, stage_config_from_json
    from edgeslim.components.transform.prune import prune

    res = prune(load_module(model.path), stage_config_from_json("prune", config_json),
                data=data_from_json(data_json))
    save_module(res.model, pruned.path)
    pruned.metadata.update({"macs": res.metrics["macs_after"], "params": res.metrics["params_after"]})
    Path(info.path).write_text(json.dumps({**res.metrics, "lineage": res.lineage, "seconds": res.seconds}))


def qat_op(config_json: str, data_json: str, model: Input[Model], qdq_model: Output[Model],
           info: Output[Artifact]):
    """Quantization-aware training into a symmetric per-channel int8 Q/DQ ONNX."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from edgeslim.components.common.model_io import load_module
    from edgeslim.components.transform.stages import data_from_json, stage_config_from_json
    from edgeslim.components.quantize.qat import qat

    with tempfile.TemporaryDirectory(prefix="edgeslim-qat-") as tmp:
        res = qat(load_module(model.path), stage_config_from_json("quantize", config_json),
                  data=data_from_json(data_json), out_dir=tmp)
        shutil.copyfile(res.model, qdq_model.path)
    Path(info.path).write_text(json.dumps({**res.metrics, "lineage": res.lineage, "seconds": res.seconds}))


def sensitivity_op(config_json: str, data_json: str, onnx_model: Input[Model], table: Output[Artifact],
                   chart: Output[Artifact]):
    """Per-layer int8 sensitivity of an fp32 ONNX: the ranked table (JSON) and a bar chart (PNG)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from edgeslim.components.transform.stages import data_from_json, stage_config_from_json
    from edgeslim.components.quantize.sensitivity import layer_sensitivity, write

    res = layer_sensitivity(onnx_model.path, stage_config_from_json("quantize", config_json),
                            data=data_from_json(data_json))
    with tempfile.TemporaryDirectory(prefix="edgeslim-sens-") as tmp:
        paths = write(res, tmp)
        shutil.copyfile(paths["png"], chart.path)
    Path(table.path).write_text(json.dumps(res, indent=1))


def quantize_auto_op(config_json: str, gate_json: str, data_json: str, tracking_uri: str,
                     parent_run_id: str, model: Input[Model], onnx_model: Input[Model],
                     parent_onnx: Input[Model], qdq_model: Output[Model], info: Output[Artifact]):
    """Accuracy-aware quantization: PTQ per calibrator, float fallback, QAT; first to pass the gate wins.

    Trials become child runs of ``parent_run_id`` (or of ``$MLFLOW_RUN_ID``) when one is given.
    """
    import json
    import shutil
    from pathlib import Path

    from edgeslim.components.quantize.search import quantize_auto
    from edgeslim.components.common.model_io import load_module
    from edgeslim.components.recipe import AccuracyGateConfig
    from edgeslim.components.transform.stages import data_from_json, stage_config_from_json

    out_dir = Path(info.path).parent / "autotune"
    res = quantize_auto(load_module(model.path), onnx_model.path, stage_config_from_json("quantize", config_json),
                        data=data_from_json(data_json), parent_onnx_path=parent_onnx.path,
                        gate=AccuracyGateConfig.from_dict(json.loads(gate_json or "{}"), prefix="gate"),
                        out_dir=out_dir, tracking_uri=tracking_uri or None,
                        parent_run_id=parent_run_id or None)
    shutil.copyfile(res.model, qdq_model.path)
    Path(info.path).write_text(json.dumps({**res.metrics, "lineage": res.lineage, "seconds": res.seconds},
                                          default=str))


def make_compress_ops(base_image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """The compression components, built on ``base_image`` (an image with edgeslim installed)."""

    def comp(fn):
        # install_kfp_package=False: the image (or the local env) already has edgeslim and kfp.
        return dsl.component(fn, base_image=base_image, install_kfp_package=False)

    return SimpleNamespace(**{f.__name__: comp(f) for f in (
        distill_op, prune_op, qat_op, sensitivity_op, quantize_auto_op)})
