"""Where tasks run on Kubernetes: engine tasks on GPU nodes of their device class, and what every
task requests, retries and reads its credentials from.

The pipeline (``edgeslim.pipelines.edge_compression``) lays out ``ops.engine_build_op`` once per
class, on the image of the class's platform (:func:`engine_image_for`: arm64 L4T images for
Jetson classes, x86_64 TensorRT images for datacenter ones), and gives each task a GPU, its
class's node selector with the CPU architecture (``kubernetes.io/arch``) and the engine
tolerations with :func:`apply_device_class_placement`. Without a CUDA device (CI, laptops, the
local runner) the task reports "not built: no CUDA device; ..." and succeeds. Every task gets
CPU and memory requests for its kind, retries, the credential Secrets and the image pull Secrets
with :func:`apply_task_settings`. The local runner has no Kubernetes: it uses none of this.
"""


from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import ConfigError, MissingDependencyError
from edgeslim.components.recipe import ClusterConfig, Recipe, ResourcesConfig

# Secret key -> environment variable (the same names). A Secret holds some of them: optional.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
RETRY_BACKOFF = "60s"  # first wait before a retry; doubles each time


def _kubernetes():
    try:
        from kfp import kubernetes
    except ImportError:
        raise MissingDependencyError("kfp-kubernetes", "kubernetes",
                                     "node selectors and secrets of Kubeflow tasks need it") from None
    return kubernetes


def check_node_selectors(config: TensorRTEngineConfig) -> None:
    """Refuse a device class whose engine task would have no node selector (it could land on any GPU).

    Raises:
        ConfigError: one line naming the class and the recipe key that fixes it.
    """
    for key in config.device_classes:
        if not config.node_selector_for(key):
            raise ConfigError(
                f"engines.node_selectors: device class {key} has no node selector, so its engine task could "
                f"run on a GPU of another class; add one to the recipe, e.g. engines.node_selectors: "
                f"{{{key}: {{nvidia.com/gpu.product: NVIDIA-L4}}}} (the labels of its build nodes)")


def quantize_trains(recipe: Recipe) -> bool:
    """Whether the quantize task can train the torch model (QAT): it is then a training task."""
    q = recipe.quantize
    return q.method == "qat" or (q.method == "auto" and bool(getattr(q, "qat", False)))


def apply_task_settings(task, kind: str, resources: ResourcesConfig, cluster: ClusterConfig):
    """Give ``task`` the CPU and memory requests of its kind, a GPU for ``train`` when asked,
    retries, and the credential Secrets as environment variables (names only, never values).

    Args:
        task: any task of the pipeline.
        kind: ``light``, ``compute``, ``train`` or ``engine`` (see ``ResourcesConfig``).
        resources: the recipe's ``resources`` section.
        cluster: the Secret names (an empty name mounts nothing).

    Returns:
        The task.

    Raises:
        MissingDependencyError: kfp-kubernetes is not installed.
    """
    kubernetes = _kubernetes()
    cpu, memory = resources.requests(kind)
    task.set_cpu_request(cpu).set_memory_request(memory)
    if kind == "train" and resources.train.gpu:
        task.set_accelerator_type(resources.train.gpu_type).set_accelerator_limit(resources.train.gpu)
    if kind == "train":
        for label, value in sorted(resources.train.node_selector.items()):
            kubernetes.add_node_selector(task, label, value)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    if resources.retries:
        task.set_retry(num_retries=resources.retries, backoff_duration=RETRY_BACKOFF, backoff_factor=2.0)
    for name, keys in ((cluster.mlflow_secret, MLFLOW_SECRET_KEYS), (cluster.s3_secret, S3_SECRET_KEYS)):
        if name:
            kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env={k: k for k in keys},
                                         optional=True)
    return task


def engine_image_for(device_class: str, config: TensorRTEngineConfig, engine_image: str) -> str:
    """The image of ``device_class``'s engine task: ``engines.images`` of the recipe, else its platform's.

    Args:
        device_class: a device-class key.
        config: the recipe's ``engines`` section.
        engine_image: the image of the x86_64 TensorRT 10 classes (``edgeslim compile --engine-image``).
    """
    from edgeslim.components.engine.devices import get_device_class
    from edgeslim.components.kfp.ops import platform_image

    if device_class in config.images:
        return config.images[device_class]
    dc = get_device_class(device_class)
    if not dc.is_jetson and dc.tensorrt_major == 10:
        return engine_image
    return platform_image(dc)


def node_selector_for(device_class: str, config: TensorRTEngineConfig) -> dict[str, str]:
    """The class's node labels (recipe, else registry) with its CPU architecture (``kubernetes.io/arch``)."""
    from edgeslim.components.engine.devices import get_device_class

    return {"kubernetes.io/arch": get_device_class(device_class).cpu_arch, **config.node_selector_for(device_class)}


def apply_device_class_placement(task, device_class: str, config: TensorRTEngineConfig):
    """Ask for a GPU, a node of the device class and its architecture, and the engine tolerations for ``task``.

    Args:
        task: an engine task (``ops.engine_build_op``).
        device_class: a device-class key.
        config: accelerator type/limit, node selectors and tolerations.

    Returns:
        The task.

    Raises:
        MissingDependencyError: kfp-kubernetes is not installed.
    """
    kubernetes = _kubernetes()
    task.set_accelerator_type(config.accelerator_type)
    task.set_accelerator_limit(config.accelerator_limit)
    kubernetes.add_node_selector_json(task, node_selector_for(device_class, config))
    for tol in config.tolerations:
        kubernetes.add_toleration(task, key=tol.get("key") or None, operator=tol.get("operator") or None,
                                  value=tol.get("value") or None, effect=tol.get("effect") or None)
    return task
