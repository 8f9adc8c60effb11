"""report.json, the HTML report, and the summary table printed by the CLI."""

from __future__ import annotations

import html as _html
import json
import time
from pathlib import Path
from typing import Any

from edgeslim.components.common.version import __version__

CPU_INT8_NOTE = (
    "CPU latency of int8 Q/DQ models under ONNX Runtime is no proxy for edge speed: on x86 without "
    "VNNI int8 runs slower than fp32. Size, MACs and accuracy carry over to the edge; CPU int8 latency does not."
)


def build_report(*, recipe, parent: dict, parent_export: dict, transform: dict, quantized: dict,
                 evaluation: dict, verdict: dict, registered: dict, onnx_path: str) -> dict[str, Any]:
    """Assemble the report from the stages' outputs."""
    src, cand = evaluation["source"], evaluation["candidate"]
    reg = None if "rejected" in registered else {
        k: registered[k] for k in ("name", "version", "alias", "run_id", "model_id", "reused") if k in registered}
    q = {k: v for k, v in quantized.items() if k not in ("seconds",)}
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


def format_table(rep: dict[str, Any]) -> str:
    rows = summary_rows(rep)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gate = rep["gate"]
    lines.append("")
    lines.append(f"gate: {'PASSED' if gate['passed'] else 'FAILED'} - {gate['summary']}")
    reg = rep["registered"]
    lines.append(f"registered: {reg['name']} version {reg['version']} @{reg['alias']}"
                 + (" (reused, same parent and recipe)" if reg.get("reused") else "")
                 if reg else "registered: nothing (the gate failed)")
    for key, status in (rep.get("engines") or {}).items():
        lines.append(f"engine {key}: {status}")
    secs = rep.get("seconds", {})
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    return "\n".join(lines)


def render_html(rep: dict[str, Any]) -> str:
    """A self-contained HTML page of the report."""
    esc = _html.escape
    rows = summary_rows(rep)
    head = "".join(f"<th>{esc(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    checks = "".join(
        f"<tr class={'ok' if c['passed'] else 'bad'}><td>{esc(c['name'])}</td><td>{c['value']}</td>"
        f"<td>{c['threshold']}</td><td>{'pass' if c['passed'] else 'FAIL'}</td><td>{esc(c['detail'])}</td></tr>"
        for c in rep["gate"]["checks"])
    reg = rep["registered"]
    reg_html = (f"{esc(reg['name'])} version {esc(str(reg['version']))} with alias {esc(reg['alias'])}"
                if reg else "nothing: the gate failed")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgeslim report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.ok{{background:#e8f5e9}}.bad{{background:#ffebee}}
pre{{background:#f5f5f5;padding:1em;overflow:auto}}</style></head><body>
<h1>edgeslim report: {esc(rep['source']['name'])} v{esc(str(rep['source']['version']))}</h1>
<p>Source <code>{esc(rep['source']['uri'])}</code>, recipe {esc(rep['recipe_hash'])}, edgeslim {esc(rep['edgeslim_version'])}.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Gate: {'passed' if rep['gate']['passed'] else 'FAILED'}</h2>
<table><tr><th>check</th><th>value</th><th>threshold</th><th>result</th><th>detail</th></tr>{checks}</table>
<h2>Registered</h2><p>{reg_html}</p>
<p><em>{esc(CPU_INT8_NOTE)}</em></p>
<h2>Full report</h2><pre>{esc(json.dumps(rep, indent=2))}</pre></body></html>"""


def log_report(rep: dict[str, Any], report_path: str, html_path: str, *, tracking_uri: str | None,
               experiment: str = "edgeslim") -> None:
    """Log the report to the registration run, or to a run that records the rejection."""
    import shutil
    import tempfile

    import mlflow

    from edgeslim.components.common.tracking import connect

    connect(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        rj, rh = Path(tmp) / "report.json", Path(tmp) / "report.html"
        shutil.copyfile(report_path, rj)
        shutil.copyfile(html_path, rh)
        reg = rep.get("registered")
        if reg and reg.get("run_id"):
            with mlflow.start_run(run_id=reg["run_id"]):
                mlflow.log_artifact(str(rj))
                mlflow.log_artifact(str(rh))
            return
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"edge {rep['source']['name']} v{rep['source']['version']} (rejected)"):
            mlflow.set_tags({"edgeslim.gate": "failed", "edgeslim.parent_name": rep["source"]["name"],
                             "edgeslim.parent_version": str(rep["source"]["version"]),
                             "edgeslim.recipe_hash": rep["recipe_hash"]})
            mlflow.log_metrics({"source_metric": rep["source"]["metric"],
                                "candidate_metric": rep["candidate"]["metric"]})
            mlflow.log_artifact(str(rj))
            mlflow.log_artifact(str(rh))
