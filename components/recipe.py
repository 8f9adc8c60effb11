"""The recipe: what `edgeslim run` compresses, with what, and where it goes.

A recipe is YAML. It is validated completely, by :func:`load_recipe`, before
anything runs; every error names the dotted key and the fix in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from edgeslim.components.common.config import Config, StageConfig, stage_config_class, unknown_key_error
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.stage_configs import DEFAULT_OPSET, OnnxExportConfig
from edgeslim.components.common.image_preprocess import ImagePreprocessConfig
from edgeslim.components.common.tracking import MODEL_URI
from edgeslim.components.common.tasks import TaskConfig, default_task_config, task_from_dict

RECIPE_VERSION = 1
# Stages that change the torch model, in any order; quantize comes last.
TORCH_STAGES = ("distill", "prune")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Which data provider feeds calibration, training and evaluation, and how its images become inputs.

    Attributes:
        provider: a name in the ``edgeslim.datasets`` entry-point group (built-ins: ``sklearn-digits``,
            ``npz``, ``digits-detect``, ``imagefolder``, ``yolo``, ``coco``).
        args: keyword arguments for the provider.
        preprocess: for image providers, resize/letterbox, crop, mean/std, channel order, layout and
            dtype, applied identically in calibration, evaluation and fine-tuning, and recorded in
            the registered edge model (:class:`~edgeslim.components.common.image_preprocess.ImagePreprocessConfig`).
    """

    provider: str = "sklearn-digits"
    args: dict = dataclasses.field(default_factory=dict)
    preprocess: ImagePreprocessConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.preprocess is None:  # recipes without one keep their digest
            d.pop("preprocess")
        return d


@dataclasses.dataclass(frozen=True)
class AccuracyGateConfig(Config):
    """What a candidate must keep to be registered.

    Attributes:
        max_metric_drop: largest allowed drop of the task metric, in points (top-1 %).
        min_top1_agreement: smallest share of test samples whose top-1 matches the parent.
        min_sqnr_db: smallest signal-to-quantization-noise ratio of the outputs
            against the parent, in dB.
        confidence: judge the top-1 drop by its interval at this level (e.g. 0.95) over the evaluation
            images, not by its point estimate: the check passes when the upper bound is within
            ``max_metric_drop``, and refuses beyond the noise when the lower bound is above it; in between the
            verdict is "not distinguishable from noise at n = <images>", a refusal that says how many images
            would decide. The accuracy-aware search judges its trials the same way. Empty: the point estimate.
    """

    max_metric_drop: float = 1.0
    min_top1_agreement: float = 0.97
    min_sqnr_db: float = 15.0
    confidence: float | None = None

    def validate(self) -> None:
        if self.max_metric_drop < 0:
            raise ConfigError(
                f"gate.max_metric_drop: got {self.max_metric_drop}; use 0 or more points"
            )
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ConfigError(
                f"gate.min_top1_agreement: got {self.min_top1_agreement}; use a share in [0, 1]"
            )
        if self.confidence is not None and not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"gate.confidence: got {self.confidence}; use a level in [0.5, 1), e.g. 0.95, "
                              "or leave it out to judge the point estimate")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Config):
    """How the candidate is measured on the test split.

    Attributes:
        latency_batches: batch sizes whose latency is reported. The evaluation's own runs over the test
            split are timed, ``b`` rows a call, until each model has its runs at each size (with nothing
            decoding meanwhile); a split too small for them is completed on its first rows.
        latency_warmup: runs discarded before timing.
        latency_repeats: timed runs; the median is reported.
        threads: ONNX Runtime intra-op threads per model. 0: ``$EDGESLIM_ORT_THREADS`` when set, else ONNX
            Runtime's own choice (one per core). The models take turns on each batch, and their idle threads
            sleep rather than spin, so that the next model and the image decoding get the cores.
        cpu_int8_kernel_samples: test images, spread evenly over the split, on which the candidate also
            runs on ONNX Runtime's fused int8 CPU kernels (reported beside the candidate's Q/DQ figure on
            the same images, never gated); 0 leaves that figure out, a number at least the split's size
            takes the whole split.
    """

    latency_batches: list[int] = dataclasses.field(default_factory=lambda: [1, 32])
    latency_warmup: int = 5
    latency_repeats: int = 30
    threads: int = 0
    cpu_int8_kernel_samples: int = 256

    def validate(self) -> None:
        self.require(bool(self.latency_batches) and all(b >= 1 for b in self.latency_batches), "latency_batches",
                     "use batch sizes >= 1", section="evaluate")
        self.require(self.latency_repeats >= 1, "latency_repeats", "use >= 1", section="evaluate")
        self.require(self.cpu_int8_kernel_samples >= 0, "cpu_int8_kernel_samples",
                     "use 0 (leave the figure out) or a number of test images", section="evaluate")


@dataclasses.dataclass(frozen=True)
class RegisterConfig(Config):
    """Where a candidate that passed the gate goes.

    Attributes:
        name: registered model name; empty means ``<parent>-edge``.
        alias: alias set on the new version.
        experiment: MLflow experiment of the compression run.
    """

    name: str = ""
    alias: str = "edge-candidate"
    experiment: str = "edgeslim"

    def validate(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.alias):
            raise ConfigError(
                f"register.alias: got {self.alias!r}; use letters, digits, '-', '_' or '.'"
            )

    def model_name(self, parent: str) -> str:
        return self.name or f"{parent}-edge"


# Kubernetes resource quantities as kfp accepts them (PipelineTask.set_cpu_request / set_memory_request).
_CPU = re.compile(r"([0-9]*[.])?[0-9]+m?")
_MEMORY = re.compile(r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?")
# A Kubernetes object name (DNS-1123 subdomain), e.g. a Secret's.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# What each kind of task asks for when the recipe says nothing.
TASK_KINDS = ("light", "compute", "train", "engine")
DEFAULT_REQUESTS = {"light": ("500m", "2Gi"), "compute": ("2", "8Gi"), "train": ("4", "16Gi"), "engine": ("2", "8Gi")}


@dataclasses.dataclass(frozen=True)
class TaskResources(Config):
    """What one kind of Kubeflow task requests from Kubernetes (the local runner ignores it).

    Attributes:
        cpu: CPU request: cores (``4``, ``0.5``) or millicores (``500m``); empty: the kind's default.
        memory: memory request: bytes with an optional suffix (``16Gi``, ``512Mi``); empty: the
            kind's default.
        gpu: GPUs requested (``train`` only; engine tasks take theirs from ``engines``).
        gpu_type: the accelerator resource asked for.
        node_selector: node labels the tasks must run on, e.g. a GPU pool's
            (``{cloud.google.com/gke-accelerator: nvidia-l4}``).
    """

    cpu: str | float = ""
    memory: str = ""
    gpu: int = 0
    gpu_type: str = "nvidia.com/gpu"
    node_selector: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.cpu != "" and not _CPU.fullmatch(self.cpu_request):
            raise ConfigError(f"cpu: got {self.cpu!r}; use cores (4, 0.5) or millicores (500m)")
        if self.memory and not _MEMORY.fullmatch(self.memory):
            raise ConfigError(f"memory: got {self.memory!r}; use a whole number with a suffix like 16Gi or 512Mi")
        self.require(self.gpu >= 0, "gpu", "use 0 or more")
        self.require(bool(self.gpu_type), "gpu_type", "name the accelerator resource, e.g. nvidia.com/gpu")
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.node_selector.items()):
            raise ConfigError(f"node_selector: got {self.node_selector!r}; use a mapping of label to value "
                              "(quote numbers: '8')")

    @property
    def cpu_request(self) -> str:
        """The CPU request as kfp takes it: ``4.0`` becomes ``4``."""
        if isinstance(self.cpu, float):
            return str(int(self.cpu)) if self.cpu.is_integer() else str(self.cpu)
        return self.cpu

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["node_selector"] = dict(self.node_selector)
        return out


@dataclasses.dataclass(frozen=True)
class ResourcesConfig(Config):
    """Kubernetes requests per kind of task, and retries: the recipe's ``resources:`` section.

    Attributes:
        light: pull, gate, plan engines, reject, report.
        compute: export, quantize (when it does not train), evaluate, register.
        train: transform (distill, prune), and quantize when it trains (method qat, or auto
            with qat: true); ``gpu: 1`` gives it a GPU.
        engine: the engine builds' CPU and memory (their GPU and nodes come from ``engines``).
        retries: times Kubeflow retries a failed task (0: none).
    """

    light: TaskResources = dataclasses.field(default_factory=TaskResources)
    compute: TaskResources = dataclasses.field(default_factory=TaskResources)
    train: TaskResources = dataclasses.field(default_factory=TaskResources)
    engine: TaskResources = dataclasses.field(default_factory=TaskResources)
    retries: int = 0

    def validate(self) -> None:
        for kind in ("light", "compute", "engine"):
            r = getattr(self, kind)
            if r.gpu or r.node_selector:
                key = "gpu" if r.gpu else "node_selector"
                where = "engines.accelerator_limit and engines.node_selectors" if kind == "engine" else "resources.train"
                raise ConfigError(f"resources.{kind}.{key}: only training tasks ask for GPUs and nodes here; "
                                  f"remove it (use {where})")
        self.require(0 <= self.retries <= 10, "retries", "use 0 (no retries) to 10", section="resources")

    def requests(self, kind: str) -> tuple[str, str]:
        """``(cpu, memory)`` requested by tasks of ``kind`` (one of ``TASK_KINDS``)."""
        r: TaskResources = getattr(self, kind)
        cpu, memory = DEFAULT_REQUESTS[kind]
        return r.cpu_request or cpu, r.memory or memory


@dataclasses.dataclass(frozen=True)
class ClusterConfig(Config):
    """Kubernetes Secrets the Kubeflow tasks read credentials from: the recipe's ``cluster:`` section.

    Every task gets them as environment variables (kfp-kubernetes ``use_secret_as_env``);
    the IR holds the names only. A missing Secret or key is skipped, so a cluster whose
    MLflow integration injects credentials needs none.

    Attributes:
        mlflow_secret: keys ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``, or
            ``MLFLOW_TRACKING_TOKEN``; empty: mount none.
        s3_secret: keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``; empty: mount none.
        image_pull_secrets: the ``kubernetes.io/dockerconfigjson`` Secrets every task pulls its
            image with (a private registry); empty: none.
    """

    mlflow_secret: str = "edgeslim-mlflow"
    s3_secret: str = "edgeslim-s3"
    image_pull_secrets: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        for key in ("mlflow_secret", "s3_secret"):
            name = getattr(self, key)
            if name and not _K8S_NAME.fullmatch(name):
                raise ConfigError(f"cluster.{key}: got {name!r}; use a Kubernetes Secret name "
                                  "(lower-case letters, digits, '-' and '.'), or \"\" for none")
        for name in self.image_pull_secrets:
            if not _K8S_NAME.fullmatch(name):
                raise ConfigError(f"cluster.image_pull_secrets: got {name!r}; use Kubernetes Secret names "
                                  "(lower-case letters, digits, '-' and '.')")


def _parse_stages(raw: Any) -> list[StageConfig]:
    if raw is None:
        raw = [{"quantize": {}}]
    if not isinstance(raw, list):
        raise ConfigError(
            "stages: expected a list like '- quantize: {method: ptq}'; got " + type(raw).__name__
        )
    out: list[StageConfig] = []
    for i, entry in enumerate(raw):
        where = f"stages[{i}]."
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(
                f"stages[{i}]: each stage is a mapping with one key, e.g. '- prune: {{...}}'"
            )
        ((stage, body),) = entry.items()
        body = dict(body or {})
        cls = stage_config_class(stage, body.pop("method", None), where)
        out.append(cls.from_dict(body, prefix=f"stages[{i}].{stage}"))
    kinds = [s.stage for s in out]
    if kinds.count("quantize") != 1 or kinds[-1] != "quantize":
        raise ConfigError(
            "stages: the last stage must be the one 'quantize' stage; "
            f"got {kinds}: move or add '- quantize: {{method: ptq}}' at the end"
        )
    if kinds.count("export") > 1:
        raise ConfigError("stages: 'export' appears more than once; keep one")
    return out


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A whole, validated recipe.

    Attributes:
        source: the registered PyTorch model to compress: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
            (logged with ``mlflow.pytorch.log_model``, ``serialization_format="pickle"`` to distil or prune it).
        data: the data provider that feeds calibration, training and evaluation.
        stages: the stages, in order: distill and prune (any order, any number), export, and the one
            quantize stage last.
        gate: what a classifier candidate must keep to be registered (a task with a gate of its own, such
            as detection, is gated by ``task.gate`` instead).
        evaluate: how the candidate is measured on the test split.
        register: where a candidate that passed the gate is registered.
        engines: the TensorRT engines built per device class.
        tracking_uri: the MLflow tracking URI; empty: ``--tracking-uri``, then ``$MLFLOW_TRACKING_URI``.
        version: the recipe format's version (1).
        task: what kind of model this is, with the task's own settings.
        resources: what each kind of Kubeflow task requests from Kubernetes (not in the recipe hash).
        cluster: the Kubernetes Secrets the Kubeflow tasks read credentials from (not in the recipe hash).
    """

    source: str
    data: DataConfig
    stages: list[StageConfig]
    gate: AccuracyGateConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    engines: TensorRTEngineConfig = dataclasses.field(default_factory=TensorRTEngineConfig)
    tracking_uri: str = ""
    version: int = RECIPE_VERSION
    task: TaskConfig = dataclasses.field(default_factory=default_task_config)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    @property
    def export(self) -> OnnxExportConfig:
        """The export stage's settings, its opset resolved for the engines' device classes."""
        config = next((s for s in self.stages if isinstance(s, OnnxExportConfig)), OnnxExportConfig())
        if config.opset is None:
            config = dataclasses.replace(config, opset=min([DEFAULT_OPSET, *engine_opset_ceilings(self.engines).values()]))
        return config

    @property
    def quantize(self) -> StageConfig:
        return self.stages[-1]

    @property
    def applied_gate(self):
        """The gate that judges the candidate: the task's own (``task.gate``) where it has one, else ``gate``."""
        return getattr(self.task, "gate", None) or self.gate

    @property
    def torch_stages(self) -> list[StageConfig]:
        return [s for s in self.stages if s.stage in TORCH_STAGES]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "tracking_uri": self.tracking_uri,
            "data": self.data.to_dict(),
            "stages": [{s.stage: s.to_dict()} for s in self.stages],
            # A task with a gate of its own (detection: task.gate) is judged by that one alone.
            **({} if hasattr(self.task, "gate") else {"gate": self.gate.to_dict()}),
            "evaluate": self.evaluate.to_dict(),
            "register": self.register.to_dict(),
            "engines": self.engines.to_dict(),
            # The default task writes no section, so classification recipes keep their digest.
            **({} if self.task == default_task_config() else {"task": self.task.to_dict()}),
            # Where tasks run, not what they make: written only when set, and not in the digest.
            **({} if self.resources == ResourcesConfig() else {"resources": self.resources.to_dict()}),
            **({} if self.cluster == ClusterConfig() else {"cluster": self.cluster.to_dict()}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """sha256 of everything that shapes the candidate (not where it is tracked)."""
        d = self.to_dict()
        for key in ("tracking_uri", "resources", "cluster"):
            d.pop(key, None)
        for key in ("images", "tolerations"):  # where engine tasks run, not what they build
            d["engines"].pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, **kw: Any) -> "Recipe":
        return dataclasses.replace(self, **kw)


_TOP_KEYS = ("version", "source", "tracking_uri", "data", "stages", "gate", "evaluate", "register", "task",
             "engines", "resources", "cluster")


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a parsed recipe mapping completely and return the ``Recipe``."""
    if not isinstance(data, dict):
        raise ConfigError("recipe: expected a mapping at the top level (source:, data:, stages:, ...)")
    for key in data:
        if key not in _TOP_KEYS:
            raise unknown_key_error(str(key), _TOP_KEYS, "")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise ConfigError(f"version: got {version!r}; this edgeslim reads recipe version 1")
    source = data.get("source")
    if not isinstance(source, str) or not MODEL_URI.match(source):
        raise ConfigError(
            f"source: got {source!r}; use a registry URI 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'"
        )
    tracking_uri = data.get("tracking_uri") or ""
    if not isinstance(tracking_uri, str):
        raise ConfigError(f"tracking_uri: got {tracking_uri!r}; expected a URI string")
    task = task_from_dict(data.get("task"))
    if data.get("gate") is not None and hasattr(task, "gate"):
        # The task judges with its own gate: a top-level one would be read and then never checked.
        raise ConfigError(f"gate: a {task.kind} recipe is gated by task.gate, and the top-level gate: would be "
                          f"ignored; move its checks under task.gate ({', '.join(_gate_keys(task))})")
    stages = _parse_stages(data.get("stages"))
    engines = TensorRTEngineConfig.from_dict(data.get("engines"), prefix="engines")
    _check_export_opset(stages, engines)
    if task.quantize_methods is not None and stages[-1].method not in task.quantize_methods:
        raise ConfigError(f"stages: quantize method {stages[-1].method!r} is not available for a {task.kind} task; "
                          f"use one of {', '.join(task.quantize_methods)}")
    return Recipe(
        source=source,
        tracking_uri=tracking_uri,
        data=DataConfig.from_dict(data.get("data"), prefix="data"),
        stages=stages,
        gate=AccuracyGateConfig.from_dict(data.get("gate"), prefix="gate"),
        evaluate=EvaluateConfig.from_dict(data.get("evaluate"), prefix="evaluate"),
        register=RegisterConfig.from_dict(data.get("register"), prefix="register"),
        engines=engines,
        task=task,
        resources=ResourcesConfig.from_dict(data.get("resources"), prefix="resources"),
        cluster=ClusterConfig.from_dict(data.get("cluster"), prefix="cluster"),
    )


def engine_opset_ceilings(engines: TensorRTEngineConfig) -> dict[str, int]:
    """The highest opset every TensorRT release of each device class parses, by class."""
    from edgeslim.components.engine.onnx_support import opset_range, recorded

    out = {}
    for key in engines.device_classes:
        known = [v for v in engines.tensorrt_versions_for(key) if recorded(v)]
        if known:
            out[key] = min(opset_range(v)[1] for v in known)
    return out


def _check_export_opset(stages: list[StageConfig], engines: TensorRTEngineConfig) -> None:
    opset = next((s.opset for s in stages if isinstance(s, OnnxExportConfig)), None)
    for key, top in engine_opset_ceilings(engines).items():
        if opset is not None and opset > top:
            raise ConfigError(f"export.opset: {opset}, but device class {key}'s TensorRT parses opset {top} at most; "
                              f"set export.opset: {top}, or remove it and the export picks the highest opset every "
                              "class in engines.device_classes parses")


def _gate_keys(task) -> list[str]:
    return [f.name for f in dataclasses.fields(task.gate)]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        ConfigError: the file is missing, is not YAML, or any key is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p}: no such file; write one with 'edgeslim init --source URI'")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {p}: not valid YAML{where}; fix the syntax") from None
    return recipe_from_dict(data)


def recipe_from_json(text: str) -> Recipe:
    return recipe_from_dict(json.loads(text))
