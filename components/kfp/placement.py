"""Where engine tasks run: one per device class, each on a GPU node of its class.

The pipeline (``edgeslim.pipelines.edge_compression``) lays out ``ops.engine_build_op`` once per
class with ``dsl.ParallelFor`` over :func:`parallel_items`, and gives each task a GPU and its
class's node selector with :func:`apply_device_class_placement`. Without a CUDA device (CI,
laptops, the local runner) the task reports "not built: no CUDA device; ..." and succeeds.
"""


from typing import Any


from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import MissingDependencyError

def parallel_items(config: TensorRTEngineConfig) -> list[dict[str, Any]]:
    """What ``dsl.ParallelFor`` iterates over: each class with its node selector."""
    return [{"device_class": k, "node_selector": config.node_selector_for(k)} for k in config.device_classes]


def apply_device_class_placement(task, device_class, config: TensorRTEngineConfig):
    """Ask for a GPU and a node of the device class for ``task``.

    Args:
        task: an engine task (``ops.engine_build_op``).
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
