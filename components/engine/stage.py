"""engines: build a TensorRT engine per device class from the Q/DQ ONNX, and verify each.

Right after a build, on the build node: deserialize the engine, run the
gate's evaluation set through it, compare with the Q/DQ ONNX under ONNX
Runtime (SQNR of every output, and the task's agreement and metric: top-1 for a
classifier, decoded detections and mAP@0.5 for a detector) and apply the engine gate.
A failing engine is not kept. Where there is no CUDA device (CI, laptops,
the local runner) the stage says so plainly and does not fail.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.common.hashing import file_sha256
from edgeslim.components.common.onnx_runtime import make_session, run_outputs, sqnr_db
from edgeslim.components.engine.config import EngineVerifyConfig, TensorRTEngineConfig
from edgeslim.components.common.errors import DataError, GateRejected
from edgeslim.components.common.result import StageResult
from edgeslim.components.engine.devices import LocalDevice, detect_local_device
from edgeslim.components.engine.builder import (ENGINE_FILE, LOG_FILE, META_FILE, NOT_BUILT_NO_CUDA, TIMING_CACHE_FILE,
                     build_engine, plan_build)
from edgeslim.components.engine.runner import EngineRunner

log = logging.getLogger(__name__)
SUMMARY_FILE = "engines.json"
VERIFY_FILE = "verification.json"
STATUS_BUILT = "built and verified"


@dataclasses.dataclass
class EngineCheck:
    """What the engine gate measured and decided."""

    metrics: dict[str, float]
    passed: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "passed": self.passed, "reasons": self.reasons}


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], labels,
                    gate: EngineVerifyConfig, task=None) -> EngineCheck:
    """Compare an engine's outputs with the Q/DQ ONNX's and apply the engine gate.

    Args:
        reference: every output of the Q/DQ ONNX under ONNX Runtime, by name, over the evaluation set.
        candidate: the engine's outputs on the same inputs.
        labels: the evaluation set's labels (the task reads them).
        gate: the thresholds.
        task: the model's Task (the default task when None): its ``engine_agreement`` measures the agreement
            and the task metric of both.
    """
    from edgeslim.components.common.tasks import default_task_config, task_for

    task = task if task is not None else task_for(default_task_config())
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or np.shape(got) != np.shape(ref):
            shape = "no such output" if got is None else f"shape {list(np.shape(got))}"
            raise DataError(f"engine output {name!r} has {shape}, the Q/DQ ONNX's {list(np.shape(ref))}; "
                            "they must match")
    figures = task.engine_agreement(reference, candidate, labels)
    m = {
        "agreement": float(figures["agreement"]),
        # the worst output: an engine that ruins one head is not saved by the others
        "sqnr_db": min(sqnr_db(reference[k], candidate[k]) for k in reference),
        "onnx_metric": float(figures["onnx_metric"]),
        "engine_metric": float(figures["engine_metric"]),
        "samples": int(len(labels)),
    }
    m["metric_drop"] = m["onnx_metric"] - m["engine_metric"]
    name = task.metric_label
    reasons = []
    if m["agreement"] < gate.min_top1_agreement:
        reasons.append(f"agreement with the Q/DQ ONNX {m['agreement']:.4f} < {gate.min_top1_agreement}")
    if m["sqnr_db"] < gate.min_sqnr_db:
        reasons.append(f"SQNR {m['sqnr_db']:.1f} dB < {gate.min_sqnr_db} dB")
    if m["metric_drop"] > gate.max_metric_drop:
        reasons.append(f"{name} {m['engine_metric']:.2f}% is {m['metric_drop']:.2f} points below the "
                       f"Q/DQ ONNX's {m['onnx_metric']:.2f}% (allowed {gate.max_metric_drop})")
    return EngineCheck(m, not reasons, reasons)


_VERIFY_BATCH = 256


def verify_engine(run: Callable[[np.ndarray], dict[str, np.ndarray]], qdq_onnx_path: str | Path, data: Splits,
                  gate: EngineVerifyConfig, task=None) -> EngineCheck:
    """Run the evaluation set through ``run`` (the engine) and through the Q/DQ ONNX; gate.

    Args:
        run: takes a batch of inputs and returns the model's outputs by name.
        qdq_onnx_path: the Q/DQ ONNX the engine was built from.
        data: the splits; the test split is the evaluation set.
        gate: thresholds and how many samples.
        task: the model's Task (:func:`compare_outputs`).
    """
    n = min(gate.samples or len(data.x_test), len(data.x_test))
    sess = make_session(qdq_onnx_path)
    reference: dict[str, list[np.ndarray]] = {}
    candidate: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, _VERIFY_BATCH):  # a batch at a time: the test split may be image files
        x = np.ascontiguousarray(data.x_test[i:min(i + _VERIFY_BATCH, n)])
        names, outs = run_outputs(sess, x, batch=len(x))
        got = run(x)
        for name, out in zip(names, outs):
            reference.setdefault(name, []).append(out)
            if name in got:
                candidate.setdefault(name, []).append(np.asarray(got[name]))
    labels = data.y_test[:n]
    return compare_outputs({k: np.concatenate(v) for k, v in reference.items()},
                           {k: np.concatenate(v) for k, v in candidate.items()},
                           labels if isinstance(labels, np.ndarray) else np.asarray(labels, dtype=object), gate, task)


def build_engines(qdq_onnx_path: str | Path, config: TensorRTEngineConfig, *, data: Splits,
                  out_dir: str | Path, local: Optional[LocalDevice] = None,
                  timing_caches: Optional[dict[str, str | Path]] = None,
                  cache_dir: str | Path | None = None, task=None) -> StageResult:
    """Build and verify one engine per device class of ``config``.

    Every class is checked first (known key, Q/DQ present for int8, profiles)
    on any machine, so a bad recipe fails in CI too. Then, per class: with no
    CUDA device, it is recorded as not built (devices build it on first
    install); otherwise the engine is built on this node, deserialized, run on
    the test split and compared with the Q/DQ ONNX under ONNX Runtime.

    Args:
        qdq_onnx_path: the int8 Q/DQ ONNX.
        config: the ``engines:`` section of the recipe.
        data: the splits; ``x_test``/``y_test`` are the evaluation set.
        out_dir: gets ``<device_class>/`` folders (``model.engine``,
            ``metadata.json``, ``build.log``, ``timing.cache``,
            ``verification.json``) and ``engines.json``, the status of each class.
        local: what this node has; detected when ``None``.
        timing_caches: per device class, a timing cache from an earlier build.
        cache_dir: the engine cache of :func:`build_engine`.
        task: the model's Task, which judges the engine's outputs (the default task when None).

    Returns:
        ``StageResult`` whose model is ``out_dir``; metrics per built class
        (``engine.<class>.agreement``, ``.sqnr_db``, ``.engine_metric`` ...); lineage with each class's status.

    Raises:
        GateRejected: an engine failed its gate (it is removed; the others stay).
        DeviceError, ConfigError, SourceError, MissingDependencyError: see
            :func:`edgeslim.components.engine.builder.build_engine`.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key in config.device_classes:
        plan_build(qdq_onnx_path, key, config)
    if local is None and config.device_classes:
        local = detect_local_device()
    statuses: dict[str, dict[str, Any]] = {}
    metrics: dict[str, Any] = {}
    rejected: list[str] = []
    for key in config.device_classes:
        if local is None:
            statuses[key] = {"status": NOT_BUILT_NO_CUDA, "built": False}
            log.warning("engine %s: %s", key, NOT_BUILT_NO_CUDA)
            continue
        class_dir = out_dir / key
        if class_dir.exists():
            shutil.rmtree(class_dir)
        built = build_engine(qdq_onnx_path, class_dir, key, config, local=local, cache_dir=cache_dir,
                             timing_cache=(timing_caches or {}).get(key))
        runner = EngineRunner(built.engine_path, built.metadata, local=local)
        try:
            check = verify_engine(runner.run, qdq_onnx_path, data, config.verify, task)
        finally:
            runner.close()
        (class_dir / VERIFY_FILE).write_text(json.dumps(check.to_dict(), indent=2))
        for name, value in check.metrics.items():
            metrics[f"engine.{key}.{name}"] = value
        if check.passed:
            statuses[key] = {"status": STATUS_BUILT, "built": True, "metadata": built.metadata,
                             "verification": check.to_dict(), "cached": built.cached}
        else:
            # A failing engine must not be registered: drop it, keep the evidence.
            (class_dir / ENGINE_FILE).unlink()
            reason = "; ".join(check.reasons)
            statuses[key] = {"status": f"rejected by the engine gate: {reason}", "built": False,
                             "verification": check.to_dict()}
            rejected.append(f"{key}: {reason}")
    summary = {"qdq_onnx_sha256": file_sha256(qdq_onnx_path), "engines": statuses}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    metrics["engines_built"] = sum(1 for s in statuses.values() if s["built"])
    metrics["engines_not_built"] = len(statuses) - metrics["engines_built"]
    if rejected:
        raise GateRejected(f"engine gate rejected {'; '.join(rejected)}; the engine is not registered")
    return StageResult(model=out_dir, metrics=metrics,
                       lineage={"engines": {k: v["status"] for k, v in statuses.items()},
                                "qdq_onnx_sha256": summary["qdq_onnx_sha256"],
                                "engines_config": config.to_json_dict()},
                       seconds=time.perf_counter() - t0)


def read_summary(engines_dir: str | Path) -> dict[str, Any]:
    """The ``engines.json`` that :func:`build_engines` wrote (empty when there is none)."""
    p = Path(engines_dir) / SUMMARY_FILE
    return json.loads(p.read_text()) if p.is_file() else {"engines": {}}


__all__ = ["build_engines", "verify_engine", "compare_outputs", "sqnr_db",
           "read_summary", "SUMMARY_FILE", "VERIFY_FILE", "STATUS_BUILT", "LOG_FILE", "META_FILE",
           "TIMING_CACHE_FILE"]


def build_engine_task(qdq_onnx_path: str | Path, device_class: str, engines_config: dict[str, Any], *,
                      data_provider: str, data_args: dict[str, Any], out_dir: str | Path,
                      previous_model_uri: str = "", data_preprocess: dict[str, Any] | None = None,
                      task: Any = None) -> dict[str, Any]:
    """What one pipeline engine task does: build and verify ``device_class`` only.

    Args:
        qdq_onnx_path: the int8 Q/DQ ONNX.
        device_class: the class this task builds for.
        engines_config: the recipe's ``engines`` section as a mapping.
        data_provider: the data provider whose test split verifies the engine.
        data_args: its arguments.
        data_preprocess: the recipe's ``data.preprocess`` (image providers), as a mapping.
        out_dir: gets ``<device_class>/`` and ``engines.json``.
        previous_model_uri: an earlier edge model whose timing cache seeds the build.
        task: the recipe's task metadata (``Task.metadata()``; None: the default task), whose task judges
            the engine's outputs.

    Returns:
        ``{device_class, status, metrics}``.
    """
    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.tasks import task_for, task_from_dict

    cfg = TensorRTEngineConfig.from_dict(engines_config, prefix="engines")
    cfg = dataclasses.replace(cfg, device_classes=[device_class],
                              node_selectors={k: v for k, v in cfg.node_selectors.items() if k == device_class})
    local = detect_local_device()
    data, timing_caches = None, {}
    if local is not None:  # without a CUDA device nothing is built: no test split to verify on, no cache to seed
        data = load_data(data_provider, data_args, data_preprocess)
        if previous_model_uri and cfg.timing_cache:
            timing_caches = previous_timing_caches(previous_model_uri, device_class)
    result = build_engines(qdq_onnx_path, cfg, data=data, out_dir=out_dir, timing_caches=timing_caches,
                           local=local, task=task_for(task_from_dict(task)))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return {"device_class": device_class, "status": result.lineage["engines"][device_class], "metrics": metrics}


def previous_timing_caches(model_uri: str, device_class: str) -> dict[str, str]:
    """The timing cache of ``device_class`` in an earlier edge model, if it has one.

    A timing cache only speeds the build up, so a model that cannot be fetched
    is logged and skipped rather than failing the task.
    """
    import tempfile

    try:
        import mlflow

        dst = tempfile.mkdtemp(prefix="edgeslim-prev-")
        local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/engines/{device_class}",
                                                    dst_path=dst)
    except Exception as exc:  # any MLflow/network failure: build without the cache
        log.warning("no timing cache from %s (%s); building without one",
                                            model_uri, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}
    path = os.path.join(local, "timing.cache")
    return {device_class: path} if os.path.isfile(path) else {}
