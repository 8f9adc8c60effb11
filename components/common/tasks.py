"""The Task protocol: everything that differs between kinds of model, behind one interface.

A task is a package under ``components/tasks/<kind>/`` (or in your own distribution) that owns what
its kind of model needs: its ``task:`` config and gate, its metrics and evaluator, its search strategy
and QAT twin, its training loss, its ``edgeslim init`` template, its report rows and charts, and a
numpy-only runtime half (:class:`TaskRuntime`) that the edge pyfunc and the device health check use
without torch. Code outside the task packages never asks which kind a model is: it asks the task.

Tasks are found through the entry-point group ``edgeslim.tasks``, the built-in ones exactly as
yours::

    [project.entry-points."edgeslim.tasks"]
    classification = "edgeslim.components.tasks.classification:ClassificationTask"
    detection = "edgeslim.components.tasks.detection:DetectionTask"

A task package's ``__init__``, ``config`` and ``runtime`` modules import no torch, mlflow or kfp at
module level: the device agent loads a task through this registry to read its runtime half.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.registry import Registry

# The task a recipe without a ``task:`` section has, and the one a registered edge model without task
# metadata is read as.
DEFAULT_KIND = "classification"

TASKS: Registry[Any] = Registry("edgeslim.tasks", "task kind", where="task.kind")


@dataclasses.dataclass(frozen=True)
class TaskConfig(Config):
    """The base of every task's ``task:`` section: its ``kind`` and the quantize methods it supports
    (``quantize_methods``: None, every registered method; a task that supports only some lists them).

    A task with a gate of its own declares a ``gate`` field; the recipe's top-level ``gate:`` then
    does not apply and is refused.

    Attributes:
        kind: the task, a name registered in the entry-point group ``edgeslim.tasks``.
    """

    kind: str = ""
    quantize_methods: ClassVar[tuple[str, ...] | None] = None

    def metadata(self) -> Any:
        """What a registered edge model records of its task (``edge_meta.json``'s ``task``)."""
        return self.to_dict()


class TaskRuntime(Protocol):
    """A task's numpy-only half: what the edge pyfunc returns and what the device health check compares.

    It runs where only numpy and ONNX Runtime are installed (a Jetson's agent), so its module imports
    neither torch nor mlflow nor kfp.
    """

    def __init__(self, config: TaskConfig) -> None: ...

    def predict(self, outputs: dict[str, Any], geometries: list | None = None) -> dict[str, Any]:
        """What a prediction holds beyond the raw outputs (a detector's decoded boxes), ``{}`` for nothing.
        ``geometries`` map input pixels back to the source images when raw images were given."""

    def golden(self, outputs: dict[str, Any], rollout: Any) -> dict[str, Any]:
        """What a release's health check records beyond the golden input and raw outputs (JSON-able);
        ``rollout`` is the rollout config (its tolerances)."""

    def compare(self, check: dict[str, Any], outputs: dict[str, Any]) -> tuple[str | None, float]:
        """A device's outputs against the health check: ``(None, worst error)`` when healthy, else
        ``(the reason in one line, worst error)``."""


@runtime_checkable
class Task(Protocol):
    """One kind of model. Attributes: ``kind`` (the registered name), ``config_class`` (parses the
    recipe's ``task:`` section), ``runtime`` (its :class:`TaskRuntime` class), ``metric_label`` (the task
    metric as the report names it), ``labels`` (what the data's ``y`` arrays hold, in words: ``edgeslim
    init`` names it when the data does not fit)."""

    kind: ClassVar[str]
    metric_label: ClassVar[str]
    config_class: ClassVar[type]
    runtime: ClassVar[type]
    labels: ClassVar[str]
    config: Any

    def __init__(self, config: Any) -> None: ...

    @classmethod
    def recognises(cls, splits: Any) -> bool:
        """Whether ``splits``' labels are this task's (``edgeslim init --task auto``)."""

    @classmethod
    def init_recipe(cls, *, source: str, output: Path, data: str, edge_name: str, splits: Any,
                    load_model: Callable) -> str:
        """The recipe ``edgeslim init`` writes for this task: ``splits`` is the data (None when it could not be
        read here), ``load_model()`` pulls the registered torch model (for a task that reads its outputs)."""

    def transform(self, model: Any, stages: list, *, data: Any, progress: Callable | None = None) -> Any:
        """The recipe's distill/prune stages, in order, with this task's loss (a ``StageResult``)."""

    def search_strategy(self, *, fp32_onnx: str | Path, reference_onnx: str | Path, recipe: Any,
                        model: Any = None) -> Any:
        """How the accuracy-aware search judges and ranks this task's trials, and its QAT twin
        (a ``quantize.search.Strategy``)."""

    def evaluate(self, candidate_onnx: str | Path, config: Any, *, parent_onnx: str | Path, data: Any,
                 student_onnx: str | Path | None = None) -> Any:
        """The candidate beside its parent on the test split: a ``StageResult`` whose metrics hold
        ``metric_name``, ``source`` and ``candidate`` (``metric``, ``fidelity``, ``size_bytes``, ``latency_ms``)."""

    def gate(self, metrics: dict[str, Any], recipe: Any) -> dict[str, Any]:
        """Judge the evaluation: ``{passed, checks, summary}``."""

    def check_model(self, model: Any, data: Any) -> None:
        """Refuse, in one line, a registered model (the torch module ``edgeslim run`` pulled, before the
        pipeline starts) whose outputs this task cannot read."""

    def metadata(self) -> Any:
        """What the registered edge model records of its task."""

    def figures(self, candidate_onnx: str | Path, *, parent_onnx: str | Path, data: Any,
                student_onnx: str | Path | None = None) -> dict[str, Any]:
        """What the report's charts draw beyond the figures of :meth:`evaluate` (on the test split)."""

    def report_rows(self, report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        """The report's summary rows beyond the metric, size and latency: (label, source, candidate, delta)."""

    def report_charts(self, report: dict[str, Any]) -> list[Any]:
        """The report's charts of this task (:class:`~edgeslim.components.common.charts.Chart`), after the
        output error's."""

    def engine_agreement(self, reference: dict[str, Any], candidate: dict[str, Any], labels: Any) -> dict[str, float]:
        """A TensorRT engine's outputs against the Q/DQ ONNX's over the evaluation set (arrays by output name):
        ``agreement`` (share in [0, 1]) and the task metric of each, ``onnx_metric`` and ``engine_metric`` (%)."""

    def logged_metrics(self, section: dict[str, Any]) -> dict[str, float]:
        """The task's own figures of an evaluation section (``source`` or ``candidate``), logged to KFP."""


def task_class(kind: str) -> Any:
    """The task registered as ``kind`` (one line naming the registered kinds if none is)."""
    return TASKS.get(kind)


def default_task_config() -> TaskConfig:
    """The ``task:`` section of a recipe that has none."""
    return task_class(DEFAULT_KIND).config_class()


def task_from_dict(raw: Any) -> TaskConfig:
    """Parse a ``task:`` section: a mapping with ``kind``, a bare kind, or None (the default task)."""
    if raw is None:
        return default_task_config()
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"task: got {raw!r}; expected a mapping like {{kind: detection, ...}}")
    kind = raw.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str):
        raise ConfigError(f"task.kind: got {kind!r}; expected a task name, one of {', '.join(TASKS.names())}")
    return task_class(kind).config_class.from_dict(raw, prefix="task")


def task_for(config: TaskConfig) -> Any:
    """The Task for a parsed ``task:`` section (``recipe.task``)."""
    return task_class(config.kind)(config)


def runtime_for(meta: Any) -> Any:
    """The runtime half for a task's metadata as an edge model or a health check records it (None: the default)."""
    config = task_from_dict(meta)
    return task_class(config.kind).runtime(config)


def compare_outputs(check: dict[str, Any], outputs: dict[str, Any]) -> tuple[str | None, float]:
    """Each golden output (``check["outputs"]``, encoded arrays) against the device's, within
    ``check["atol"]``/``check["rtol"]``: ``(None, worst)`` or ``(reason, worst)``. The comparison of raw
    outputs that a task whose outputs are plain tensors uses as its runtime's ``compare``."""
    import numpy as np

    from edgeslim.components.common.arrays import decode_array

    worst = 0.0
    atol, rtol = float(check.get("atol", 1e-3)), float(check.get("rtol", 1e-3))
    for name, blob in check["outputs"].items():
        if name not in outputs:
            return f"model has no output {name!r} (has {sorted(outputs)})", worst
        want, got = decode_array(blob), np.asarray(outputs[name], dtype=np.float32)
        if want.shape != got.shape:
            return f"output {name!r} has shape {list(got.shape)}; golden is {list(want.shape)}", worst
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        worst = max(worst, err)
        if not np.allclose(got, want, atol=atol, rtol=rtol):
            return f"output {name!r} differs from the golden output (max abs error {err:.4g} > atol {atol:g})", err
    return None, worst


def fused_kernel_row(candidate: dict[str, Any], label: str, test_samples: int | None = None
                     ) -> list[tuple[str, str, str, str]]:
    """The report's row of the candidate on ONNX Runtime's fused int8 CPU kernels (never gated): ``label``
    (the task metric, as the report names it), on how many test images, beside the candidate's Q/DQ figure
    on the same images. Empty when the evaluation left it out."""
    value = candidate.get("cpu_int8_kernel_metric")
    if value is None:
        return []
    n, qdq = candidate.get("cpu_int8_kernel_samples"), candidate.get("cpu_int8_kernel_qdq_metric")
    on = f", {n:,} of {test_samples:,} test images" if n is not None and test_samples and n < test_samples else ""
    note = f"Q/DQ on the same images {qdq:.2f}; not gated" if qdq is not None else "not gated"
    return [(f"{label}, ORT fused int8 CPU kernels (%){on}", "", f"{value:.2f}", note)]
