"""engine_op: the KFP component of the engines stage, and where its tasks run.

No ``from __future__ import annotations`` here: kfp reads the real annotations.

One engine task per device class (``dsl.ParallelFor`` over
:func:`parallel_items`); each asks for a GPU and a node of its class through
:func:`apply_device_class_placement`. Without a CUDA device (CI, laptops, the
local runner) the task reports "not built: no CUDA device; ..." and succeeds.

Usage in a pipeline::

    with dsl.ParallelFor(parallel_items(engines_config)) as item:
        task = engine_op(qdq_onnx=q.outputs["qdq_onnx"], device_class=item.device_class,
                         engines_config_json=json.dumps(engines_config.to_dict()),
                         data_provider=..., data_args_json=json.dumps(...))
        apply_device_class_placement(task, item, engines_config)
"""


import os
from typing import Any

from kfp import dsl
from kfp.dsl import Input, Model, Output

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import MissingDependencyError

# The image engine tasks run in: edgeslim with its `tensorrt` extra on a CUDA base.
ENGINE_IMAGE = os.environ.get("EDGESLIM_ENGINE_IMAGE", "edgeslim-tensorrt:latest")


@dsl.component(base_image=ENGINE_IMAGE)
def engine_op(qdq_onnx: Input[Model], device_class: str, engines_config_json: str, data_provider: str,
              data_args_json: str, engines: Output[Model], previous_model_uri: str = "") -> str:
    """Build and verify the engine of ``device_class``.

    Returns JSON ``{device_class, status, path, uri}``: the status line and where
    the ``engines`` artifact is, so that the register task can ship the engine.

    Args:
        qdq_onnx: the int8 Q/DQ ONNX.
        device_class: the exact device-class key this task builds for.
        engines_config_json: the recipe's ``engines:`` section as JSON
            (``json.dumps(config.to_dict())``; JSON because KFP structs hold no nulls).
        data_provider: the data provider whose test split is the evaluation set.
        data_args_json: the provider's arguments as JSON.
        engines: gets ``<device_class>/`` (engine, metadata, build log,
            timing cache, verification) and ``engines.json``.
        previous_model_uri: an earlier edge model (e.g. ``models:/NAME@edge-stable``)
            whose timing cache for this class seeds the build; empty: none.
    """
    import json

    from edgeslim.components.engine.stage import build_engine_task

    def parse(v):  # kfp's local runner hands JSON-looking strings over already parsed
        return v if isinstance(v, (dict, list)) else json.loads(v or "{}")

    res = build_engine_task(qdq_onnx.path, device_class, parse(engines_config_json), data_provider=data_provider,
                            data_args=parse(data_args_json), out_dir=engines.path,
                            previous_model_uri=previous_model_uri)
    engines.metadata.update({"device_class": device_class, "status": res["status"], **res["metrics"]})
    print(f"engine {device_class}: {res['status']}")
    return json.dumps({"device_class": device_class, "status": res["status"], "path": engines.path,
                       "uri": engines.uri})


def parallel_items(config: TensorRTEngineConfig) -> list[dict[str, Any]]:
    """What ``dsl.ParallelFor`` iterates over: each class with its node selector."""
    return [{"device_class": k, "node_selector": config.node_selector_for(k)} for k in config.device_classes]


def apply_device_class_placement(task, device_class, config: TensorRTEngineConfig):
    """Ask for a GPU and a node of the device class for ``task``.

    Args:
        task: the ``engine_op`` task.
        device_class: a device-class key, or the ``ParallelFor`` loop item over
            :func:`parallel_items` (its ``node_selector`` is then used).
        config: accelerator type/limit and node selectors.

    Returns:
        The task.

    Raises:
        MissingDependencyError: kfp-kubernetes is not installed.
    """
    try:
        from kfp import kubernetes
    except ImportError:
        raise MissingDependencyError("kfp-kubernetes", "kubernetes",
                                     "node selectors for engine tasks need it") from None
    task.set_accelerator_type(config.accelerator_type)
    task.set_accelerator_limit(config.accelerator_limit)
    if isinstance(device_class, str):
        kubernetes.add_node_selector_json(task, config.node_selector_for(device_class))
    else:
        kubernetes.add_node_selector_json(task, device_class.node_selector)
    return task
