"""The report's data: :func:`build_report` assembles report.json from the stages' outputs and
:func:`summary_rows` its table of source against candidate. :mod:`edgeslim.components.report_render`
renders them (the CLI's table, the HTML page and its charts, MLflow). What differs by task (its rows,
its charts, the figures its evaluation measured for them) comes from the report's task.
"""

from __future__ import annotations

import time
from typing import Any

from edgeslim.components.common.version import __version__

CPU_INT8_NOTE = (
    "CPU latency of int8 Q/DQ models under ONNX Runtime is no proxy for edge speed: on x86 without "
    "VNNI int8 runs slower than fp32. Size, MACs and accuracy carry over to the edge; CPU int8 latency does not."
)


def build_report(*, recipe, parent: dict, parent_export: dict, transform: dict, quantized: dict,
                 evaluation: dict, verdict: dict, registered: dict, onnx_path: str,
                 kfp_run: dict[str, str] | None = None) -> dict[str, Any]:
    """Assemble the report from the stages' outputs."""
    src, cand = evaluation["source"], evaluation["candidate"]
    kind = recipe.task.kind  # the task's own section of the evaluation (a detector's mAP@0.5:0.95, ...)
    transform_curve = transform.get("training_curve")
    reg = None if "rejected" in registered else {
        k: registered[k] for k in ("name", "version", "alias", "run_id", "model_id", "reused") if k in registered}
    q = {k: v for k, v in quantized.items() if k not in ("seconds", "training_curve", "mlflow_run_id")}
    transform = {k: v for k, v in transform.items() if k != "training_curve"}
    return {
        "edgeslim_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe_hash": recipe.digest(),
        "task": recipe.task.metadata(),
        "metric_name": evaluation.get("metric_name", "top1"),
        "test_samples": evaluation.get("test_samples"),
        "source": {
            "uri": recipe.source, "name": parent["name"], "version": parent["version"],
            "run_id": parent.get("run_id"), "model_id": parent.get("model_id"),
            "metric": src["metric"], "size_bytes": src["size_bytes"], "latency_ms": src["latency_ms"],
            "macs": src.get("macs"), "params": src.get("params"),
            **task_sections(src, kind),
        },
        "candidate": {
            "metric": cand["metric"], "fidelity": cand["fidelity"], "size_bytes": cand["size_bytes"],
            "size_ratio": cand.get("size_ratio"), "latency_ms": cand["latency_ms"],
            "macs": cand.get("macs"), "params": cand.get("params"),
            "cpu_int8_kernel_metric": cand.get("cpu_int8_kernel_metric"),
            # the images it was measured on (a sample of the test split) and the Q/DQ figure on them
            "cpu_int8_kernel_samples": cand.get("cpu_int8_kernel_samples"),
            "cpu_int8_kernel_qdq_metric": cand.get("cpu_int8_kernel_qdq_metric"),
            "student_fp32_size_bytes": evaluation.get("student_fp32_size_bytes"),
            "onnx_path": str(onnx_path),
            "quantization": q,
            **task_sections(cand, kind),
        },
        "transform": transform,
        # what the charts draw beyond the figures above (evaluate's output error and PR curves)
        "figures": evaluation.get("figures") or {},
        # (stage, epoch, mean loss) of distill, prune and QAT, as the tasks recorded them
        "training_curve": [*(transform_curve or []), *(quantized.get("training_curve") or [])],
        # the MLflow run of the quantize search (its trials are child runs) and the KFP run
        "runs": {"quantize": quantized.get("mlflow_run_id"), **{f"kfp_{k}": v for k, v in (kfp_run or {}).items()}},
        "gate": {"passed": verdict["passed"], "checks": verdict["checks"], "summary": verdict["summary"]},
        "confidence": drop_confidence(recipe, evaluation, quantized, verdict),
        "registered": reg,
        "engines": registered.get("engines", {}),
        "seconds": {
            "pull": parent.get("seconds", 0.0), "export": parent_export.get("seconds", 0.0),
            "transform": transform.get("seconds", 0.0), "quantize": quantized.get("seconds", 0.0),
            "evaluate": evaluation.get("seconds", 0.0), "register": registered.get("seconds", 0.0),
        },
        "notes": [CPU_INT8_NOTE],
    }


def drop_confidence(recipe, evaluation: dict, quantized: dict, verdict: dict) -> dict[str, Any]:
    """Each gated drop with its interval on the validation split (where the search judged the chosen trial)
    and on the test split, at the gate's confidence level (95% where it sets none), and the images that would
    decide it against its allowance (:func:`~edgeslim.components.common.confidence.drop_intervals`); ``{}``
    where the evaluation kept no per-image records."""
    from edgeslim.components.common.confidence import REPORT_LEVEL, drop_intervals

    stats = evaluation.get("confidence") or {}
    if not stats:  # an evaluation that kept no per-image records
        return {}
    level = getattr(recipe.applied_gate, "confidence", None)
    allowed = {c["name"]: c["threshold"] for c in verdict["checks"] if c["name"] in stats}
    test = drop_intervals(stats, allowed, level)
    val = ((quantized.get("winner") or {}).get("intervals")) or {}
    return {"level": level or REPORT_LEVEL, "gated": level is not None,
            "drops": [{"name": name, "allowed": allowed[name], "val": val.get(name), "test": test[name]}
                      for name in test]}


def drop_rows(rep: dict[str, Any]) -> list[tuple[str, ...]]:
    """The report's table of drops: each with its interval on val and on test, its allowance, and the
    validation images that would decide it (the test split's figure where the search judged nothing on val)."""
    conf = rep.get("confidence") or {}
    if not conf.get("drops"):
        return []
    label = report_task(rep).metric_label
    pct = f"{100 * conf['level']:g}%"

    def cell(iv):
        return (f"{iv['drop']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}], n = {iv['n']:,}" if iv else
                "not judged on val")

    rows = [("drop", f"val: drop [{pct} interval]", f"test: drop [{pct} interval]", "allowed",
             "val images a decision needs")]
    for d in conf["drops"]:
        name = label if d["name"] == "metric_drop" else d["name"].removesuffix("_drop")
        need = (d["val"] or d["test"]).get("images_needed")
        rows.append((name, cell(d["val"]), cell(d["test"]), f"{d['allowed']:g}",
                     f"{need:,}" if need else "none (the drop sits on the allowance)"))
    return rows


def task_sections(section: dict[str, Any], kind: str) -> dict[str, Any]:
    """The task's own parts of an evaluation section: those named by its kind, or a variant of it
    (``segmentation``, ``instance_segmentation``)."""
    return {k: v for k, v in section.items() if isinstance(v, dict) and (k == kind or k.endswith(f"_{kind}"))}


def report_task(rep: dict[str, Any]):
    """The Task whose report this is (its ``task`` metadata; a report without one is the default task's)."""
    from edgeslim.components.common.tasks import task_for, task_from_dict

    return task_for(task_from_dict(rep.get("task")))


def summary_rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The summary table: the task metric, size, MACs and parameters (where counted) and CPU latency of
    both, then the task's own rows."""
    s, c = rep["source"], rep["candidate"]
    task = report_task(rep)
    rows = [("", "source fp32", "int8 candidate", "ratio / delta"),
            (f"{task.metric_label} (%)", f"{s['metric']:.2f}", f"{c['metric']:.2f}",
             f"{c['metric'] - s['metric']:+.2f} pt"),
            ("size (bytes)", f"{s['size_bytes']:,}", f"{c['size_bytes']:,}",
             f"{s['size_bytes'] / max(c['size_bytes'], 1):.2f}x smaller")]
    for key, label in (("macs", "MACs per sample"), ("params", "parameters")):
        if isinstance(s.get(key), int) and isinstance(c.get(key), int):
            rows.append((label, f"{s[key]:,}", f"{c[key]:,}", f"{s[key] / max(c[key], 1):.2f}x fewer"))
    for b, ms in s["latency_ms"].items():
        cm = c["latency_ms"].get(b)
        if cm is not None:
            rows.append((f"CPU latency {b.replace('_', ' ')} (ms)", f"{ms:.3f}", f"{cm:.3f}",
                         f"{ms / max(cm, 1e-9):.2f}x (CPU only)"))
    return rows + task.report_rows(rep)
