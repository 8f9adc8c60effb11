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

from edgeslim.components.common import stage_configs  # noqa: F401  (registers the stage configs)
from edgeslim.components.common.config import Config, StageConfig, stage_config_class, unknown_key_error
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.tracking import MODEL_URI
from edgeslim.components.common.task_config import ClassificationTaskConfig, TaskConfig, task_from_dict

RECIPE_VERSION = 1
# Stages that change the torch model, in any order; quantize comes last.
TORCH_STAGES = ("distill", "prune")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Which data provider feeds calibration, training and evaluation.

    Attributes:
        provider: a name in the ``edgeslim.datasets`` entry-point group
            (built-ins: ``sklearn-digits``, ``npz``).
        args: keyword arguments for the provider.
    """

    provider: str = "sklearn-digits"
    args: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AccuracyGateConfig(Config):
    """What a candidate must keep to be registered.

    Attributes:
        max_metric_drop: largest allowed drop of the task metric, in points (top-1 %).
        min_top1_agreement: smallest share of test samples whose top-1 matches the parent.
        min_sqnr_db: smallest signal-to-quantization-noise ratio of the outputs
            against the parent, in dB.
    """

    max_metric_drop: float = 1.0
    min_top1_agreement: float = 0.97
    min_sqnr_db: float = 15.0

    def validate(self) -> None:
        if self.max_metric_drop < 0:
            raise ConfigError(
                f"gate.max_metric_drop: got {self.max_metric_drop}; use 0 or more points"
            )
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ConfigError(
                f"gate.min_top1_agreement: got {self.min_top1_agreement}; use a share in [0, 1]"
            )


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Config):
    """How the candidate is measured on the test split.

    Attributes:
        latency_batches: batch sizes whose latency is reported.
        latency_warmup: runs discarded before timing.
        latency_repeats: timed runs; the median is reported.
        threads: ONNX Runtime intra-op threads (0: its default).
    """

    latency_batches: list[int] = dataclasses.field(default_factory=lambda: [1, 32])
    latency_warmup: int = 5
    latency_repeats: int = 30
    threads: int = 0

    def validate(self) -> None:
        self.require(bool(self.latency_batches) and all(b >= 1 for b in self.latency_batches), "latency_batches",
                     "use batch sizes >= 1", section="evaluate")
        self.require(self.latency_repeats >= 1, "latency_repeats", "use >= 1", section="evaluate")


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
    """A whole, validated recipe."""

    source: str
    data: DataConfig
    stages: list[StageConfig]
    gate: AccuracyGateConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    engines: TensorRTEngineConfig = dataclasses.field(default_factory=TensorRTEngineConfig)
    tracking_uri: str = ""
    version: int = RECIPE_VERSION
    task: TaskConfig = dataclasses.field(default_factory=ClassificationTaskConfig)

    @property
    def export(self) -> stage_configs.OnnxExportConfig:
        for s in self.stages:
            if isinstance(s, stage_configs.OnnxExportConfig):
                return s
        return stage_configs.OnnxExportConfig()

    @property
    def quantize(self) -> StageConfig:
        return self.stages[-1]

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
            "gate": self.gate.to_dict(),
            "evaluate": self.evaluate.to_dict(),
            "register": self.register.to_dict(),
            "engines": self.engines.to_dict(),
            # The default task writes no section, so classification recipes keep their digest.
            **({} if self.task == ClassificationTaskConfig() else {"task": self.task.to_dict()}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """sha256 of everything that shapes the candidate (not where it is tracked)."""
        d = self.to_dict()
        d.pop("tracking_uri")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, **kw: Any) -> "Recipe":
        return dataclasses.replace(self, **kw)


_TOP_KEYS = ("version", "source", "tracking_uri", "data", "stages", "gate", "evaluate", "register", "task",
             "engines")


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
    stages = _parse_stages(data.get("stages"))
    if stages[-1].method not in task.quantize_methods:
        raise ConfigError(f"stages: quantize method {stages[-1].method!r} is not available for a {task.kind} task "
                          f"({task.why_not_qat}); use one of {', '.join(task.quantize_methods)}")
    return Recipe(
        source=source,
        tracking_uri=tracking_uri,
        data=DataConfig.from_dict(data.get("data"), prefix="data"),
        stages=stages,
        gate=AccuracyGateConfig.from_dict(data.get("gate"), prefix="gate"),
        evaluate=EvaluateConfig.from_dict(data.get("evaluate"), prefix="evaluate"),
        register=RegisterConfig.from_dict(data.get("register"), prefix="register"),
        engines=TensorRTEngineConfig.from_dict(data.get("engines"), prefix="engines"),
        task=task,
    )


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
