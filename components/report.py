"""The report's data: :func:`build_report` assembles report.json from the stages' outputs and
:func:`summary_rows` its table of source against candidate. :mod:`edgeslim.components.report_render`
renders them (the CLI's table, the HTML page and its charts, MLflow); the figures the charts draw
beyond the stages' outputs come from :mod:`edgeslim.components.report_figures`.
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
    transform_curve = transform.get("training_curve")
    reg = None if "rejected" in registered else {
        k: registered[k] for k in ("name", "version", "alias", "run_id", "model_id", "reused") if k in registered}
    q = {k: v for k, v in quantized.items() if k not in ("seconds", "training_curve", "mlflow_run_id")}
    transform = {k: v for k, v in transform.items() if k != "training_curve"}
    return {
        "edgeslim_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe_hash": recipe.digest(),
        "metric_name": evaluation.get("metric_name", "top1"),
        "test_samples": evaluation.get("test_samples"),
        "source": {
            "uri": recipe.source, "name": parent["name"], "version": parent["version"],
            "run_id": parent.get("run_id"), "model_id": parent.get("model_id"),
            "metric": src["metric"], "size_bytes": src["size_bytes"], "latency_ms": src["latency_ms"],
            **({"detection": src["detection"]} if "detection" in src else {}),
        },
        "candidate": {
            "metric": cand["metric"], "fidelity": cand["fidelity"], "size_bytes": cand["size_bytes"],
            "size_ratio": cand.get("size_ratio"), "latency_ms": cand["latency_ms"],
            "cpu_int8_kernel_metric": cand.get("cpu_int8_kernel_metric"),
            "student_fp32_size_bytes": evaluation.get("student_fp32_size_bytes"),
            "onnx_path": str(onnx_path),
            "quantization": q,
            **({"detection": cand["detection"]} if "detection" in cand else {}),
        },
        "transform": transform,
        # what the charts draw beyond the figures above (evaluate's output error and PR curves)
        "figures": evaluation.get("figures") or {},
        # (stage, epoch, mean loss) of distill, prune and QAT, as the tasks recorded them
        "training_curve": [*(transform_curve or []), *(quantized.get("training_curve") or [])],
        # the MLflow run of the quantize search (its trials are child runs) and the KFP run
        "runs": {"quantize": quantized.get("mlflow_run_id"), **{f"kfp_{k}": v for k, v in (kfp_run or {}).items()}},
        "gate": {"passed": verdict["passed"], "checks": verdict["checks"], "summary": verdict["summary"]},
        "registered": reg,
        "engines": registered.get("engines", {}),
        "seconds": {
            "pull": parent.get("seconds", 0.0), "export": parent_export.get("seconds", 0.0),
            "transform": transform.get("seconds", 0.0), "quantize": quantized.get("seconds", 0.0),
            "evaluate": evaluation.get("seconds", 0.0), "register": registered.get("seconds", 0.0),
        },
        "notes": [CPU_INT8_NOTE],
    }


_METRIC_LABELS = {"top1": "top1", "map50": "mAP@0.5"}


def summary_rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    s, c = rep["source"], rep["candidate"]
    rows = [("", "source fp32", "int8 candidate", "ratio / delta"),
            (f"{_METRIC_LABELS.get(rep.get('metric_name', 'top1'), rep.get('metric_name'))} (%)",
             f"{s['metric']:.2f}", f"{c['metric']:.2f}",
             f"{c['metric'] - s['metric']:+.2f} pt"),
            ("size (bytes)", f"{s['size_bytes']:,}", f"{c['size_bytes']:,}",
             f"{s['size_bytes'] / max(c['size_bytes'], 1):.2f}x smaller")]
    for b, ms in s["latency_ms"].items():
        cm = c["latency_ms"].get(b)
        if cm is not None:
            rows.append((f"CPU latency {b.replace('_', ' ')} (ms)", f"{ms:.3f}", f"{cm:.3f}",
                         f"{ms / max(cm, 1e-9):.2f}x (CPU only)"))
    if "detection" in s and "detection" in c:
        return rows + _detection_rows(s["detection"], c["detection"], c)
    rows.append(("top-1 agreement", "", f"{c['fidelity']['top1_agreement']:.4f}", ""))
    rows.append(("output SQNR (dB)", "", f"{c['fidelity']['sqnr_db']:.2f}", ""))
    if c.get("cpu_int8_kernel_metric") is not None:
        rows.append(("top-1, ORT fused int8 CPU kernels (%)", "", f"{c['cpu_int8_kernel_metric']:.2f}", "not gated"))
    return rows


def _detection_rows(s: dict[str, Any], c: dict[str, Any], cand: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """mAP@0.5:0.95 and the score-calibration figures the detection gate checks."""
    thr = c.get("score_threshold", 0.25)
    rows = [("mAP@0.5:0.95 (%)", f"{s['map50_95']:.2f}", f"{c['map50_95']:.2f}",
             f"{c['map50_95'] - s['map50_95']:+.2f} pt"),
            ("mean true-positive score", f"{s['mean_tp_score']:.3f}", f"{c['mean_tp_score']:.3f}",
             f"{c['mean_tp_score'] - s['mean_tp_score']:+.3f}"),
            (f"recall at score >= {thr:g} (%)", f"{s['recall']:.2f}", f"{c['recall']:.2f}",
             f"{c['recall'] - s['recall']:+.2f} pt"),
            (f"precision at score >= {thr:g} (%)", f"{s['precision']:.2f}", f"{c['precision']:.2f}",
             f"{c['precision'] - s['precision']:+.2f} pt"),
            ("detection agreement", "", f"{cand['fidelity'].get('detection_agreement', 0.0):.4f}", "")]
    if cand.get("cpu_int8_kernel_metric") is not None:
        rows.append(("mAP@0.5, ORT fused int8 CPU kernels (%)", "", f"{cand['cpu_int8_kernel_metric']:.2f}",
                     "not gated"))
    quant = cand.get("quantization") or {}
    ranges, floats = quant.get("ranges") or {}, set(quant.get("float_outputs") or [])
    outs = {k: v for k, v in ranges.items() if k.startswith("output")}
    if outs:
        rows.append(("calibrated amax of the outputs", "", ", ".join(
            f"{k} float" if k in floats else f"{k} {v:.3g}" for k, v in outs.items()),
            "float: not quantized (head kept in float, or placement: weighted)" if floats else ""))
    return rows
