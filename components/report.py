"""report.json, the HTML report with its charts, and the summary table printed by the CLI.

The charts are inline SVG written here (no plotting library, nothing fetched): accuracy and size
per search trial, per-layer (or per-head) sensitivity, the int8 output error against its fp32
model, precision-recall curves of a detector, and the training curves. Each is drawn from the
report's own data; a chart whose data is absent is one line saying why. :func:`log_report`
logs the same SVGs to MLflow as ``charts/*.svg``.
"""

from __future__ import annotations

import dataclasses
import html as _html
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

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


# --- the figures the evaluate task measures for the charts ----------------------------------------


class _OutputError:
    """int8 minus fp32 over every output value of a split, batch by batch: per-output SQNR exactly,
    the error distribution from a seeded sample (at most ``cap`` values are kept)."""

    def __init__(self, cap: int = 200_000, per_batch: int = 20_000, seed: int = 0):
        from edgeslim.components.common.onnx_runtime import SqnrAccumulator

        self._acc = SqnrAccumulator
        self.cap, self.per_batch = cap, per_batch
        self.rng = np.random.default_rng(seed)
        self.sqnr: dict[str, Any] = {}
        self.power: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.samples: dict[str, list[np.ndarray]] = {}

    def add(self, reference: tuple[list[np.ndarray], list[str]], candidate: tuple[list[np.ndarray], list[str]]) -> None:
        (ref_outs, names), (cand_outs, _) = reference, candidate
        # the same share of every output's values: the sample is drawn evenly from all of them
        rate = min(1.0, self.per_batch / max(sum(np.size(r) for r in ref_outs), 1))
        for name, r, c in zip(names, ref_outs, cand_outs):
            r = np.asarray(r, np.float64).ravel()
            e = np.asarray(c, np.float64).ravel() - r
            self.sqnr.setdefault(name, self._acc()).add(r, r + e)
            self.power[name] = self.power.get(name, 0.0) + float(np.sum(r * r))
            self.count[name] = self.count.get(name, 0) + r.size
            if rate < 1.0:
                e = e[self.rng.choice(e.size, max(1, round(e.size * rate)), replace=False)]
            self.samples.setdefault(name, []).append(e)

    def result(self, reference: str, bins: int = 41) -> dict[str, Any]:
        outputs, normalized = [], []
        for name in self.sqnr:
            rms = math.sqrt(self.power[name] / max(self.count[name], 1)) or 1.0
            db = self.sqnr[name].db()
            outputs.append({"name": name, "sqnr_db": round(db, 3) if math.isfinite(db) else None,
                            "rms": round(rms, 6), "values": self.count[name]})
            normalized.append(np.concatenate(self.samples[name]) / rms)
        n = np.concatenate(normalized) if normalized else np.zeros(0)
        if n.size > self.cap:
            n = n[self.rng.choice(n.size, self.cap, replace=False)]
        span = float(np.quantile(np.abs(n), 0.999)) if n.size else 0.0
        span = span if span > 0 else (float(np.abs(n).max()) if n.size and np.abs(n).max() > 0 else 1e-6)
        counts, edges = np.histogram(n, bins=bins, range=(-span, span))
        return {
            "reference": reference, "unit": "RMS of the fp32 output",
            "outputs": outputs,
            "histogram": {"edges": [float(f"{v:.6g}") for v in edges], "counts": [int(c) for c in counts],
                          "outside": int((np.abs(n) > span).sum()), "sampled": int(n.size),
                          "total": int(sum(self.count.values()))},
            "rms_error": round(float(np.sqrt(np.mean(n * n))), 6) if n.size else 0.0,
            "max_abs_error": round(float(np.abs(n).max()), 6) if n.size else 0.0,
        }


def pr_curve(preds, gts, num_classes: int, score_threshold: float, *, iou: float = 0.5,
             points: int = 200) -> dict[str, Any]:
    """Precision against recall at IoU ``iou``, all classes pooled (each prediction matches only boxes of its
    own class, greedily by score, as :mod:`.tasks.detection` matches them for mAP), at most ``points``
    points, and the operating point at ``score_threshold``."""
    from edgeslim.components.tasks.detection.evaluate import _match

    preds = [np.asarray(p, np.float32).reshape(-1, 6) for p in preds]
    gts = [np.asarray(g, np.float32).reshape(-1, 5) for g in gts]
    scores, tps, n_gt = [], [], 0
    for c in range(num_classes):
        s, tp, n = _match(preds, gts, c, iou)
        scores.append(s)
        tps.append(tp)
        n_gt += n
    s, tp = np.concatenate(scores), np.concatenate(tps)
    out: dict[str, Any] = {"iou": iou, "ground_truth": int(n_gt), "detections": int(len(s)),
                           "score_threshold": score_threshold, "recall": [], "precision": [], "at_threshold": None}
    if not n_gt or not len(s):
        return out
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], tp[order]
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, len(tp) + 1)
    recall = ctp / n_gt
    idx = np.unique(np.linspace(0, len(s) - 1, min(points, len(s))).round().astype(int))
    out["recall"] = [round(float(v), 5) for v in recall[idx]]
    out["precision"] = [round(float(v), 5) for v in precision[idx]]
    k = int((s >= score_threshold).sum())
    if k:
        out["at_threshold"] = {"recall": round(float(recall[k - 1]), 5), "precision": round(float(precision[k - 1]), 5)}
    return out


def evaluation_figures(candidate_onnx: str | Path, *, parent_onnx: str | Path, data, task=None,
                       student_onnx: str | Path | None = None) -> dict[str, Any]:
    """What the report's charts need from the evaluate task, on the test split: the int8 output error
    against its own fp32 model (the student when distill/prune made one, else the parent) and, for a
    detector (``task`` a detection task config), the precision-recall curves of fp32 and int8.

    Runs the models once more over the test split, a batch at a time (a lazy split is read once).
    """
    from edgeslim.components.common.onnx_runtime import make_session, run_outputs

    own = student_onnx is not None and Path(student_onnx).resolve() != Path(parent_onnx).resolve()
    reference = "the fp32 student it was quantized from" if own else "the fp32 parent it was quantized from"
    err = _OutputError()
    x = data.x_test
    if getattr(task, "kind", "") == "detection":
        from edgeslim.components.tasks.detection.evaluate import detect_batches

        paths = [parent_onnx, candidate_onnx, *([student_onnx] if own else [])]
        ref = 2 if own else 0
        dets = detect_batches(paths, x, task, basic=True, on_batch=lambda raw: err.add(raw[ref], raw[1]))
        gts = list(data.y_test)
        return {"output_error": err.result(reference), "pr": {
            "fp32": pr_curve(dets[0], gts, task.num_classes, task.score_threshold),
            "int8": pr_curve(dets[1], gts, task.num_classes, task.score_threshold)}}
    ref_sess = make_session(student_onnx if own else parent_onnx, basic=True)
    cand_sess = make_session(candidate_onnx, basic=True)
    for i in range(0, len(x), 256):
        xb = np.ascontiguousarray(x[i:i + 256])
        r_names, r_outs = run_outputs(ref_sess, xb, batch=len(xb))
        _, c_outs = run_outputs(cand_sess, xb, batch=len(xb))
        err.add((r_outs, r_names), (c_outs, r_names))
    return {"output_error": err.result(reference)}


# --- inline SVG charts ------------------------------------------------------------------------------

SVG_NS = "http://www.w3.org/2000/svg"
_INK, _GRID, _MUTED = "#333333", "#e3e3e3", "#777777"
_PASS, _FAIL, _FP32, _INT8, _BAR = "#2e7d32", "#c62828", "#1f77b4", "#d62728", "#2c7fb8"
_STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.0f}"


def _label(v: float) -> str:
    """A tick label: 3 significant digits, thousands as k."""
    if v == 0:
        return "0"
    if abs(v) >= 10_000:
        return f"{v / 1000:.0f}k"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-6:
        out.append(round(v, 10))
        v += step
    return out


def _span(values: list[float], *, zero: bool = False, pad: float = 0.08) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.05 or 0.5), hi + (abs(hi) * 0.05 or 0.5)
    d = (hi - lo) * pad
    return (lo if zero and lo == 0.0 else lo - d), (hi if zero and hi == 0.0 else hi + d)


class _Svg:
    """A small SVG canvas: every shape carries its own style, so the file reads the same standalone."""

    def __init__(self, width: int, height: int, title: str):
        self.w, self.h, self.title, self.parts = width, height, title, []

    def text(self, x, y, s, *, size=11, anchor="start", fill=_INK, weight="normal", rotate=False):
        rot = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
                          f'font-weight="{weight}"{rot}>{_html.escape(str(s))}</text>')

    def line(self, x1, y1, x2, y2, *, stroke=_INK, width=1.0, dash=""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                          f'stroke-width="{width}"{d}/>')

    def rect(self, x, y, w, h, *, fill=_BAR, stroke="none", width=1.0, tip=""):
        t = f"<title>{_html.escape(tip)}</title>" if tip else ""
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.0):.1f}" height="{max(h, 0.0):.1f}" '
                          f'fill="{fill}" stroke="{stroke}" stroke-width="{width}">{t}</rect>')

    def circle(self, cx, cy, r, *, fill=_BAR, stroke="none", width=1.0, tip=""):
        t = f"<title>{_html.escape(tip)}</title>" if tip else ""
        self.parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{fill}" stroke="{stroke}" '
                          f'stroke-width="{width}">{t}</circle>')

    def polyline(self, pts, *, stroke=_BAR, width=2.0, dash=""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        xy = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        self.parts.append(f'<polyline points="{xy}" fill="none" stroke="{stroke}" stroke-width="{width}" '
                          f'stroke-linejoin="round"{d}/>')

    def legend(self, x, y, items):
        """``items``: (label, colour, kind) with kind ``dot``, ``ring``, ``line``, ``dash`` or ``box``."""
        for label, colour, kind in items:
            if kind in ("line", "dash"):
                self.line(x, y - 4, x + 18, y - 4, stroke=colour, width=2.5, dash="5,3" if kind == "dash" else "")
                x += 22
            elif kind == "box":
                self.rect(x, y - 10, 11, 11, fill=colour)
                x += 15
            else:
                self.circle(x + 5, y - 4, 5, fill=colour if kind == "dot" else "none",
                            stroke=colour if kind == "ring" else "none", width=2)
                x += 14
            self.text(x, y, label, size=11)
            x += 7 * len(label) + 16

    def render(self) -> str:
        return (f'<svg xmlns="{SVG_NS}" width="{self.w}" height="{self.h}" viewBox="0 0 {self.w} {self.h}" '
                f'role="img" font-family="sans-serif"><title>{_html.escape(self.title)}</title>'
                f'<rect x="0" y="0" width="{self.w}" height="{self.h}" fill="#ffffff"/>'
                + "".join(self.parts) + "</svg>")


@dataclasses.dataclass
class _Panel:
    """A plot area of an :class:`_Svg` with linear axes."""

    svg: _Svg
    x0: float
    y0: float
    w: float
    h: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def X(self, v: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (v - lo) / (hi - lo) * self.w

    def Y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.y0 + self.h - (v - lo) / (hi - lo) * self.h

    def axes(self, *, xlabel: str = "", ylabel: str = "", xticks: bool = True, yticks: bool = True,
             ygrid: bool = True, xgrid: bool = False) -> None:
        s = self.svg
        if yticks:
            for t in _ticks(*self.ylim, n=4):
                if self.ylim[0] - 1e-9 <= t <= self.ylim[1] + 1e-9:
                    y = self.Y(t)
                    if ygrid:
                        s.line(self.x0, y, self.x0 + self.w, y, stroke=_GRID)
                    s.text(self.x0 - 5, y + 4, _label(t), size=10, anchor="end", fill=_MUTED)
        if xticks:
            for t in _ticks(*self.xlim, n=5):
                if self.xlim[0] - 1e-9 <= t <= self.xlim[1] + 1e-9:
                    x = self.X(t)
                    if xgrid:
                        s.line(x, self.y0, x, self.y0 + self.h, stroke=_GRID)
                    s.line(x, self.y0 + self.h, x, self.y0 + self.h + 4, stroke=_MUTED)
                    s.text(x, self.y0 + self.h + 15, _label(t), size=10, anchor="middle", fill=_MUTED)
        s.line(self.x0, self.y0 + self.h, self.x0 + self.w, self.y0 + self.h, stroke=_INK)
        s.line(self.x0, self.y0, self.x0, self.y0 + self.h, stroke=_INK)
        if xlabel:
            s.text(self.x0 + self.w / 2, self.y0 + self.h + (30 if xticks else 16), xlabel, size=11, anchor="middle")
        if ylabel:
            s.text(self.x0 - 42, self.y0 + self.h / 2, ylabel, size=11, anchor="middle", rotate=True)


@dataclasses.dataclass
class Chart:
    """One chart of the report: its SVG, or ``None`` and the line saying why there is none."""

    key: str
    title: str
    svg: str | None
    caption: str


def _metric_field(rep: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, str]:
    fields = (("metric", "top-1 on val (%)"), ("map50", "mAP@0.5 on val (%)"))
    for key, label in fields[::-1] if rep.get("metric_name") == "map50" else fields:
        if rows and all(isinstance(r.get(key), (int, float)) for r in rows):
            return key, label
    return "", ""


def trials_chart(rep: dict[str, Any]) -> Chart:
    q = rep["candidate"].get("quantization") or {}
    rows = [r for r in q.get("trials") or [] if isinstance(r, dict)]
    title = "Accuracy and size per quantization trial"
    if not rows:
        method = "qat (one fine-tuning, no search)" if "qat_epochs" in q else "ptq (one calibration, no search)"
        cal = f" with the {q['calibrator']} calibrator" if q.get("calibrator") else ""
        return Chart("trials", title, None, f"No search trials: quantize method {method}{cal}; "
                     "method auto tries calibrators, float fallback and QAT, one trial each.")
    key, ylabel = _metric_field(rep, rows)
    winner = (q.get("winner") or {}).get("trial")
    n = len(rows)
    step = 74
    w = max(460, 90 + step * n)
    svg = _Svg(w, 372, title)
    svg.text(12, 20, title, size=14, weight="bold")
    xlim = (0.5, n + 0.5)
    top = _Panel(svg, 70, 48, w - 90, 130, xlim, _span([r.get(key) for r in rows], pad=0.2) if key else (0, 1))
    top.axes(ylabel="metric" if not key else ylabel.split(" (")[0] + " %", xticks=False)
    sizes = [r["size_bytes"] / 1000 for r in rows]
    bottom = _Panel(svg, 70, 200, w - 90, 100, xlim, (0.0, _span(sizes, zero=True)[1]))
    bottom.axes(ylabel="size (kB)", xticks=False)
    for i, r in enumerate(rows, 1):
        colour = _PASS if r.get("passed") else _FAIL
        x = top.X(i)
        tip = (f"trial {r['trial']} {r['kind']} {r.get('calibrator', '')}: "
               f"{r.get(key, float('nan')):.2f}% on val, {r['size_bytes']:,} B, "
               f"{len(r.get('float_layers') or [])} node(s) in float, {'passed' if r.get('passed') else 'failed'}")
        if key:
            y = top.Y(r[key])
            svg.circle(x, y, 6, fill=colour, tip=tip)
            if r["trial"] == winner:
                svg.circle(x, y, 10, fill="none", stroke=_INK, width=2)
            svg.text(x, y - 13, _num(r[key]), size=10, anchor="middle")
        bw = min(40, step * 0.6)
        svg.rect(x - bw / 2, bottom.Y(sizes[i - 1]), bw, bottom.Y(0) - bottom.Y(sizes[i - 1]), fill=colour, tip=tip)
        svg.text(x, bottom.Y(sizes[i - 1]) - 4, _label(sizes[i - 1]), size=10, anchor="middle")
        svg.text(x, 318, f"{r['trial']}: {r['kind']}", size=10, anchor="middle")
        extra = (f"+{len(r.get('float_layers') or [])} float" if r["kind"] == "fallback"
                 else str(r.get("calibrator", "")))
        svg.text(x, 331, extra[:14], size=10, anchor="middle", fill=_MUTED)
    svg.legend(70, 358, [("passed the gate", _PASS, "dot"), ("failed", _FAIL, "dot"), ("chosen", _INK, "ring")])
    win = next((r for r in rows if r["trial"] == winner), None)
    cap = (f"{n} trial(s), judged on the validation split; trial {winner} was chosen "
           f"({win['kind']}, {win.get('calibrator')}, {win['size_bytes']:,} B)." if win else
           f"{n} trial(s), judged on the validation split; none passed.")
    return Chart("trials", title, svg.render(), cap)


def sensitivity_chart(rep: dict[str, Any], limit: int = 30) -> Chart:
    q = rep["candidate"].get("quantization") or {}
    title = "Per-layer int8 sensitivity"
    table = q.get("sensitivity")
    heads = q.get("head_sensitivity")
    if isinstance(table, dict) and table.get("layers"):
        rows = table["layers"][:limit]
        series = [("top-1 drop (pt) when only this layer is int8", "metric_drop", _FAIL),
                  ("output SQNR (dB)", "sqnr_db", _BAR)]
        label = "layer"
        cap = (f"{len(table['layers'])} conv/linear layer(s) of the fp32 model, each alone in int8 "
               f"({table.get('calibrator')} calibration, {table.get('split')} split), most sensitive on top"
               + (f"; the first {limit} shown." if len(table["layers"]) > limit else "."))
    elif heads:
        rows = heads[:limit]
        title = "Per-head int8 sensitivity"
        series = [("damage when only this head is int8", "damage", _FAIL), ("mAP@0.5 (%)", "map50", _BAR)]
        label = "output"
        cap = ("Damage = mAP@0.5 drop + 100 x mean true-positive score drop + recall drop (points), "
               "each head group alone in int8, on the validation split; most damaging on top.")
    else:
        trials = q.get("trials") or []
        winner = q.get("winner") or {}
        why = ("only the accuracy-aware search (quantize method auto) ranks layers" if not trials else
               f"PTQ trial {winner.get('trial')} passed, so no layer had to be ranked for float fallback"
               if winner.get("kind") == "ptq" else "the search ranked no layers (quantize.max_float_layers: 0)")
        return Chart("sensitivity", title, None, f"Per-layer sensitivity: not computed; {why}.")
    n = len(rows)
    lw = 150
    pw = 230
    h = 70 + 20 * n + 40
    w = 20 + lw + 2 * (pw + 40)
    svg = _Svg(w, h, title)
    svg.text(12, 20, title, size=14, weight="bold")
    for k, (name, field, colour) in enumerate(series):
        vals = [float(r.get(field) or 0.0) for r in rows]
        vals = [min(v, 80.0) if field == "sqnr_db" else v for v in vals]  # an exact layer's SQNR is inf
        p = _Panel(svg, 20 + lw + k * (pw + 40), 50, pw, 20 * n, _span(vals, zero=True), (0, n))
        p.axes(xlabel=name, yticks=False, xgrid=True)
        for i, (r, v) in enumerate(zip(rows, vals)):
            y = p.y0 + 20 * i + 3
            x0, x1 = p.X(min(v, 0.0)), p.X(max(v, 0.0))
            svg.rect(x0, y, x1 - x0, 14, fill=colour, tip=f"{r.get(label)}: {field} {r.get(field)}")
            raw = r.get(field)
            shown = "exact" if field == "sqnr_db" and isinstance(raw, float) and math.isinf(raw) else _num(v)
            inside = x1 + 30 > p.x0 + pw  # no room after the bar: the label goes inside it, in white
            svg.text(x1 - 3 if inside else x1 + 3, y + 11, shown, size=9, fill="#ffffff" if inside else _MUTED,
                     anchor="end" if inside else "start")
            if k == 0:
                svg.text(p.x0 - 6, y + 11, str(r.get(label))[:22], size=10, anchor="end")
    return Chart("sensitivity", title, svg.render(), cap)


def output_error_chart(rep: dict[str, Any]) -> Chart:
    fig = (rep.get("figures") or {}).get("output_error")
    title = "int8 output error against fp32"
    if not fig:
        err = (rep.get("figures") or {}).get("error")
        return Chart("output-error", title, None, "Output error: not measured"
                     + (f" ({err})." if err else " (the evaluate task recorded no figures)."))
    hist = fig["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    outs = [o for o in fig["outputs"] if o.get("sqnr_db") is not None]
    side = len(fig["outputs"]) > 1
    w = 760 if side else 520
    svg = _Svg(w, 300, title)
    svg.text(12, 20, title, size=14, weight="bold")
    total = max(sum(counts), 1)
    share = [100.0 * c / total for c in counts]
    p = _Panel(svg, 64, 44, 420 if side else 430, 200, (edges[0], edges[-1]), (0.0, _span(share, zero=True)[1]))
    p.axes(xlabel=f"int8 - fp32, in units of the {fig['unit']}", ylabel="share of values (%)")
    for lo, hi, v in zip(edges, edges[1:], share):
        svg.rect(p.X(lo) + 0.5, p.Y(v), p.X(hi) - p.X(lo) - 1, p.Y(0) - p.Y(v), fill=_INT8,
                 tip=f"[{lo:.3g}, {hi:.3g}): {v:.2f}%")
    if side:
        q = _Panel(svg, 600, 44, 140, 200, _span([o["sqnr_db"] for o in outs] or [0.0], zero=True),
                   (0, max(len(fig["outputs"]), 1)))
        q.axes(xlabel="SQNR per output (dB)", yticks=False, xgrid=True)
        bh = 200 / max(len(fig["outputs"]), 1)
        for i, o in enumerate(fig["outputs"]):
            y = q.y0 + i * bh + bh * 0.15
            db = o["sqnr_db"] if o.get("sqnr_db") is not None else 0.0
            svg.rect(q.X(0), y, q.X(db) - q.X(0), bh * 0.7, fill=_BAR, tip=f"{o['name']}: {o.get('sqnr_db')} dB")
            svg.text(q.x0 - 5, y + bh * 0.35 + 4, o["name"][:14], size=10, anchor="end")
            svg.text(q.X(db) + 3, y + bh * 0.35 + 4, "exact" if o.get("sqnr_db") is None else f"{db:.1f}",
                     size=9, fill=_MUTED)
    dbs = ", ".join(f"{o['name']} {o['sqnr_db']:.1f} dB" if o.get("sqnr_db") is not None else f"{o['name']} exact"
                    for o in fig["outputs"])
    cap = (f"Every output value of the test split, int8 candidate minus {fig['reference']} "
           f"({hist['sampled']:,} of {hist['total']:,} values sampled; {hist['outside']:,} beyond the axis); "
           f"RMS error {fig['rms_error']:.3g}, largest {fig['max_abs_error']:.3g}. SQNR: {dbs}.")
    return Chart("output-error", title, svg.render(), cap)


def pr_chart(rep: dict[str, Any]) -> Chart | None:
    """Detectors only (``None`` for other tasks)."""
    pr = (rep.get("figures") or {}).get("pr")
    title = "Precision-recall, fp32 and int8"
    if not pr:
        if rep.get("metric_name") == "map50":
            return Chart("pr", title, None, "Precision-recall curves: not recorded by the evaluate task.")
        return None
    if not any(pr[k]["recall"] for k in ("fp32", "int8")):
        return Chart("pr", title, None, "Precision-recall curves: no detections or no ground-truth boxes "
                     "in the test split.")
    svg = _Svg(520, 400, title)
    svg.text(12, 20, title, size=14, weight="bold")
    p = _Panel(svg, 64, 44, 300, 300, (0.0, 1.0), (0.0, 1.05))
    p.axes(xlabel="recall", ylabel="precision", xgrid=True)
    thr = pr["fp32"].get("score_threshold")
    for key, colour, dash in (("fp32", _FP32, ""), ("int8", _INT8, "6,3")):
        c = pr[key]
        svg.polyline([(p.X(r), p.Y(q)) for r, q in zip(c["recall"], c["precision"])], stroke=colour, dash=dash)
        if c.get("at_threshold"):
            a = c["at_threshold"]
            svg.circle(p.X(a["recall"]), p.Y(a["precision"]), 5, fill=colour, stroke="#ffffff", width=1.5,
                       tip=f"{key} at score >= {thr}: recall {a['recall']:.3f}, precision {a['precision']:.3f}")
    det = (rep["source"].get("detection") or {}), (rep["candidate"].get("detection") or {})
    svg.legend(380, 70, [("fp32", _FP32, "line")])
    svg.legend(380, 90, [("int8", _INT8, "dash")])
    svg.text(380, 116, f"mAP@0.5 {det[0].get('map50', float('nan')):.1f}%", size=10, fill=_FP32)
    svg.text(380, 130, f"mAP@0.5 {det[1].get('map50', float('nan')):.1f}%", size=10, fill=_INT8)
    svg.circle(385, 152, 5, fill=_MUTED)
    svg.text(394, 156, f"score >= {thr:g}", size=10)
    cap = (f"Test split, IoU 0.5, all classes pooled ({pr['fp32']['ground_truth']:,} boxes); the dots are the "
           "deployment score threshold. mAP is the mean over classes, so it is not the area under these pooled curves.")
    return Chart("pr", title, svg.render(), cap)


def training_chart(rep: dict[str, Any]) -> Chart:
    rows = [r for r in rep.get("training_curve") or [] if isinstance(r.get("loss"), (int, float))]
    title = "Training loss per epoch"
    if not rows:
        return Chart("training", title, None, "Training curves: nothing trained (no distill or prune stage "
                     "with epochs, and quantize ran no QAT).")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    pw, ph = 220, 170
    w = 30 + len(stages) * (pw + 70)
    svg = _Svg(max(w, 320), 290, title)
    svg.text(12, 20, title, size=14, weight="bold")
    for k, stage in enumerate(stages):
        pts = [(r["epoch"], r["loss"]) for r in rows if r["stage"] == stage]
        xs = [e for e, _ in pts]
        p = _Panel(svg, 70 + k * (pw + 70), 60, pw, ph, (min(xs) - 0.5, max(xs) + 0.5) if len(xs) > 1 else
                   (min(xs) - 1, max(xs) + 1), _span([v for _, v in pts]))
        p.axes(xlabel="epoch", ylabel="mean loss" if k == 0 else "")
        colour = _STAGE_COLORS[k % len(_STAGE_COLORS)]
        svg.text(p.x0 + pw / 2, 50, stage, size=12, anchor="middle", weight="bold", fill=colour)
        svg.polyline([(p.X(e), p.Y(v)) for e, v in pts], stroke=colour)
        for e, v in pts:
            svg.circle(p.X(e), p.Y(v), 3, fill=colour, tip=f"{stage} epoch {e}: {v:.4f}")
    cap = "Mean training loss of each epoch: " + "; ".join(
        f"{s} {len([r for r in rows if r['stage'] == s])} epoch(s)" for s in stages) + "."
    return Chart("training", title, svg.render(), cap)


def charts(rep: dict[str, Any]) -> list[Chart]:
    """The report's charts, in page order (a detector's precision-recall curves after the output error)."""
    out = [trials_chart(rep), sensitivity_chart(rep), output_error_chart(rep)]
    pr = pr_chart(rep)
    if pr is not None:
        out.append(pr)
    out.append(training_chart(rep))
    return out


def write_charts(rep: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Each drawn chart as ``<out_dir>/<key>.svg``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in charts(rep):
        if c.svg:
            path = out_dir / f"{c.key}.svg"
            path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + c.svg + "\n")
            paths.append(path)
    return paths


def _chart_html(c: Chart) -> str:
    esc = _html.escape
    if c.svg is None:
        return f'<p class="nochart" id="chart-{c.key}">{esc(c.caption)}</p>'
    return (f'<figure class="chart" id="chart-{c.key}">{c.svg}<figcaption>{esc(c.caption)}</figcaption>'
            "</figure>")


def render_html(rep: dict[str, Any]) -> str:
    """A self-contained HTML page of the report: its charts are inline SVG, nothing is fetched."""
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
    figures = "\n".join(_chart_html(c) for c in charts(rep))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgeslim report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.ok{{background:#e8f5e9}}.bad{{background:#ffebee}}
pre{{background:#f5f5f5;padding:1em;overflow:auto}}figure.chart{{margin:1.5em 0}}
figure.chart svg{{max-width:100%;height:auto;border:1px solid #eee}}
figcaption{{color:#555;font-size:0.9em;max-width:60em}}
p.nochart{{color:#555;font-style:italic}}</style></head><body>
<h1>edgeslim report: {esc(rep['source']['name'])} v{esc(str(rep['source']['version']))}</h1>
<p>Source <code>{esc(rep['source']['uri'])}</code>, recipe {esc(rep['recipe_hash'])}, edgeslim {esc(rep['edgeslim_version'])}.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Gate: {'passed' if rep['gate']['passed'] else 'FAILED'}</h2>
<table><tr><th>check</th><th>value</th><th>threshold</th><th>result</th><th>detail</th></tr>{checks}</table>
<h2>Registered</h2><p>{reg_html}</p>
<h2>Charts</h2>
{figures}
<p><em>{esc(CPU_INT8_NOTE)}</em></p>
<h2>Full report</h2><pre>{esc(json.dumps(rep, indent=2))}</pre></body></html>"""


# --- MLflow -------------------------------------------------------------------------------------


def _curve_metrics(rep: dict[str, Any]):
    """The training curves as MLflow step metrics ``train.<stage>.loss`` (step = epoch)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"train.{r['stage']}.loss", float(r["loss"]), now, int(r["epoch"]))
            for r in rep.get("training_curve") or [] if isinstance(r.get("loss"), (int, float))
            and math.isfinite(r["loss"])]


def link_tags(rep: dict[str, Any]) -> dict[str, str]:
    """Tags that link the runs of one compression: the quantize run and the KFP run."""
    runs = rep.get("runs") or {}
    names = {"quantize": "edgeslim.quantize_run_id", "kfp_run_id": "edgeslim.kfp_run_id",
             "kfp_run_name": "edgeslim.kfp_run_name"}
    return {tag: str(runs[k]) for k, tag in names.items() if runs.get(k)}


def log_report(rep: dict[str, Any], report_path: str, html_path: str, *, tracking_uri: str | None,
               experiment: str = "edgeslim") -> None:
    """Log the report, its charts (``charts/*.svg``) and the training curves (``train.<stage>.loss``,
    step = epoch) to the registration run, or to a run that records the rejection; tag the runs and
    the model version with the runs they came from (the quantize search's, the KFP run)."""
    import shutil
    import tempfile

    import mlflow

    from edgeslim.components.common.tracking import connect

    client = connect(tracking_uri)
    tags = link_tags(rep)
    with tempfile.TemporaryDirectory() as tmp:
        rj, rh = Path(tmp) / "report.json", Path(tmp) / "report.html"
        shutil.copyfile(report_path, rj)
        shutil.copyfile(html_path, rh)
        svgs = write_charts(rep, Path(tmp) / "charts")
        reg = rep.get("registered")

        def log_all(run_id: str, *, curves: bool) -> None:
            mlflow.log_artifact(str(rj))
            mlflow.log_artifact(str(rh))
            for p in svgs:
                mlflow.log_artifact(str(p), artifact_path="charts")
            if curves and (metrics := _curve_metrics(rep)):
                client.log_batch(run_id, metrics=metrics)

        if reg and reg.get("run_id"):
            with mlflow.start_run(run_id=reg["run_id"]):
                # A reused version was made (and its curves logged) by an earlier run: only the reports change.
                log_all(reg["run_id"], curves=not reg.get("reused"))
                if not reg.get("reused"):
                    mlflow.set_tags(tags)
            if not reg.get("reused"):
                for k, v in tags.items():
                    client.set_model_version_tag(reg["name"], str(reg["version"]), k, v)
                _tag_quantize_run(client, rep, {"edgeslim.compression_run_id": reg["run_id"],
                                                "edgeslim.model_version": f"{reg['name']}/{reg['version']}"})
            return
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"edge {rep['source']['name']} v{rep['source']['version']} (rejected)") as run:
            mlflow.set_tags({"edgeslim.gate": "failed", "edgeslim.parent_name": rep["source"]["name"],
                             "edgeslim.parent_version": str(rep["source"]["version"]),
                             "edgeslim.recipe_hash": rep["recipe_hash"], **tags})
            mlflow.log_metrics({"source_metric": rep["source"]["metric"],
                                "candidate_metric": rep["candidate"]["metric"]})
            log_all(run.info.run_id, curves=True)
        _tag_quantize_run(client, rep, {"edgeslim.compression_run_id": run.info.run_id})


def _tag_quantize_run(client, rep: dict[str, Any], tags: dict[str, str]) -> None:
    qid = (rep.get("runs") or {}).get("quantize")
    if qid:
        for k, v in tags.items():
            client.set_tag(qid, k, v)
