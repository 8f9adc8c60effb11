"""The report rendered: the summary table the CLI prints (:func:`format_table`), the self-contained
HTML page (:func:`render_html`) with its charts, the charts as standalone SVG files
(:func:`write_charts`), and all of it logged to MLflow (:func:`log_report`).

The charts are inline SVG (:mod:`edgeslim.components.common.charts`; no plotting library, nothing
fetched): accuracy and size per search trial, per-layer (or per-head) sensitivity, the int8 output
error against its fp32 model, precision-recall curves of a detector, and the training curves. Each is
drawn from the report's own data (:mod:`edgeslim.components.report`); a chart whose data is absent is
one line saying why. :func:`log_report` logs the same SVGs to MLflow as ``charts/*.svg``.
"""

from __future__ import annotations

import html as _html
import json
import math
import time
from pathlib import Path
from typing import Any

from edgeslim.components.common.charts import (
    BAR, FAIL, INK, INT8, MUTED, PASS, STAGE_COLORS, Chart, Panel, Svg, bar_panels, num, span, tick_label,
    write_svg)
from edgeslim.components.engine.stage import STATUS_BUILT
from edgeslim.components.quantize.sensitivity import CHART_SERIES
from edgeslim.components.report import CPU_INT8_NOTE, drop_rows, report_task, summary_rows


def format_table(rep: dict[str, Any]) -> str:
    rows = summary_rows(rep)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gate = rep["gate"]
    lines.append("")
    lines.append(f"gate: {'PASSED' if gate['passed'] else 'FAILED'} - {gate['summary']}")
    drops = drop_rows(rep)
    if drops:
        lines.append("")
        dw = [max(len(r[i]) for r in drops) for i in range(len(drops[0]))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, dw)).rstrip() for r in drops]
        if not rep["confidence"].get("gated"):
            lines.append("(the gate judged the point estimates: set its confidence to judge the intervals)")
    reg = rep["registered"]
    lines.append(f"registered: {reg['name']} version {reg['version']} @{reg['alias']}"
                 + (" (reused, same parent and recipe)" if reg.get("reused") else "")
                 if reg else "registered: nothing (the gate failed)")
    for key, status in (rep.get("engines") or {}).items():
        lines.append(f"engine {key}: {status}")
    secs = rep.get("seconds", {})
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    return "\n".join(lines)


def _metric_field(rep: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The trials' field of the task metric (a strategy's rows name it as the evaluation does, or ``metric``)."""
    label = f"{report_task(rep).metric_label} on val (%)"
    for key in (rep.get("metric_name"), "metric"):
        if key and rows and all(isinstance(r.get(key), (int, float)) for r in rows):
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
    svg = Svg(w, 372, title)
    svg.text(12, 20, title, size=14, weight="bold")
    xlim = (0.5, n + 0.5)
    top = Panel(svg, 70, 48, w - 90, 130, xlim, span([r.get(key) for r in rows], pad=0.2) if key else (0, 1))
    top.axes(ylabel="metric" if not key else ylabel.split(" (")[0] + " %", xticks=False)
    sizes = [r["size_bytes"] / 1000 for r in rows]
    bottom = Panel(svg, 70, 200, w - 90, 100, xlim, (0.0, span(sizes, zero=True)[1]))
    bottom.axes(ylabel="size (kB)", xticks=False)
    for i, r in enumerate(rows, 1):
        colour = PASS if r.get("passed") else FAIL
        x = top.X(i)
        tip = (f"trial {r['trial']} {r['kind']} {r.get('calibrator', '')}: "
               f"{r.get(key, float('nan')):.2f}% on val, {r['size_bytes']:,} B, "
               f"{len(r.get('float_layers') or [])} node(s) in float, {'passed' if r.get('passed') else 'failed'}")
        if key:
            y = top.Y(r[key])
            svg.circle(x, y, 6, fill=colour, tip=tip)
            if r["trial"] == winner:
                svg.circle(x, y, 10, fill="none", stroke=INK, width=2)
            svg.text(x, y - 13, num(r[key]), size=10, anchor="middle")
        bw = min(40, step * 0.6)
        svg.rect(x - bw / 2, bottom.Y(sizes[i - 1]), bw, bottom.Y(0) - bottom.Y(sizes[i - 1]), fill=colour, tip=tip)
        svg.text(x, bottom.Y(sizes[i - 1]) - 4, tick_label(sizes[i - 1]), size=10, anchor="middle")
        svg.text(x, 318, f"{r['trial']}: {r['kind']}", size=10, anchor="middle")
        extra = (f"+{len(r.get('float_layers') or [])} float" if r["kind"] == "fallback"
                 else str(r.get("calibrator", "")))
        svg.text(x, 331, extra[:14], size=10, anchor="middle", fill=MUTED)
    svg.legend(70, 358, [("passed the gate", PASS, "dot"), ("failed", FAIL, "dot"), ("chosen", INK, "ring")])
    win = next((r for r in rows if r["trial"] == winner), None)
    cap = (f"{n} trial(s), judged on the validation split; trial {winner} was chosen "
           f"({win['kind']}, {win.get('calibrator')}, {win['size_bytes']:,} B)." if win else
           f"{n} trial(s), judged on the validation split; none passed.")
    return Chart("trials", title, svg.render(), cap)


def sensitivity_chart(rep: dict[str, Any], limit: int = 30) -> Chart:
    q = rep["candidate"].get("quantization") or {}
    title = "Per-layer int8 sensitivity"
    table = q.get("sensitivity")
    if isinstance(table, dict) and table.get("layers"):
        rows = table["layers"][:limit]
        series = CHART_SERIES
        label = "layer"
        cap = (f"{len(table['layers'])} conv/linear layer(s) of the fp32 model, each alone in int8 "
               f"({table.get('calibrator')} calibration, {table.get('split')} split), most sensitive on top"
               + (f"; the first {limit} shown." if len(table["layers"]) > limit else "."))
    else:
        trials = q.get("trials") or []
        winner = q.get("winner") or {}
        why = ("only the accuracy-aware search (quantize method auto) ranks layers" if not trials else
               f"PTQ trial {winner.get('trial')} passed, so no layer had to be ranked for float fallback"
               if winner.get("kind") == "ptq" else "the search ranked no layers (quantize.max_float_layers: 0)")
        return Chart("sensitivity", title, None, f"Per-layer sensitivity: not computed; {why}.")
    return Chart("sensitivity", title, bar_panels(title, rows, label, series), cap)


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
    svg = Svg(w, 300, title)
    svg.text(12, 20, title, size=14, weight="bold")
    total = max(sum(counts), 1)
    share = [100.0 * c / total for c in counts]
    p = Panel(svg, 64, 44, 420 if side else 430, 200, (edges[0], edges[-1]), (0.0, span(share, zero=True)[1]))
    p.axes(xlabel=f"int8 - fp32, in units of the {fig['unit']}", ylabel="share of values (%)")
    for lo, hi, v in zip(edges, edges[1:], share):
        svg.rect(p.X(lo) + 0.5, p.Y(v), p.X(hi) - p.X(lo) - 1, p.Y(0) - p.Y(v), fill=INT8,
                 tip=f"[{lo:.3g}, {hi:.3g}): {v:.2f}%")
    if side:
        q = Panel(svg, 600, 44, 140, 200, span([o["sqnr_db"] for o in outs] or [0.0], zero=True),
                   (0, max(len(fig["outputs"]), 1)))
        q.axes(xlabel="SQNR per output (dB)", yticks=False, xgrid=True)
        bh = 200 / max(len(fig["outputs"]), 1)
        for i, o in enumerate(fig["outputs"]):
            y = q.y0 + i * bh + bh * 0.15
            db = o["sqnr_db"] if o.get("sqnr_db") is not None else 0.0
            svg.rect(q.X(0), y, q.X(db) - q.X(0), bh * 0.7, fill=BAR, tip=f"{o['name']}: {o.get('sqnr_db')} dB")
            svg.text(q.x0 - 5, y + bh * 0.35 + 4, o["name"][:14], size=10, anchor="end")
            svg.text(q.X(db) + 3, y + bh * 0.35 + 4, "exact" if o.get("sqnr_db") is None else f"{db:.1f}",
                     size=9, fill=MUTED)
    dbs = ", ".join(f"{o['name']} {o['sqnr_db']:.1f} dB" if o.get("sqnr_db") is not None else f"{o['name']} exact"
                    for o in fig["outputs"])
    cap = (f"Every output value of the test split, int8 candidate minus {fig['reference']} "
           f"({hist['sampled']:,} of {hist['total']:,} values sampled; {hist['outside']:,} beyond the axis); "
           f"RMS error {fig['rms_error']:.3g}, largest {fig['max_abs_error']:.3g}. SQNR: {dbs}.")
    return Chart("output-error", title, svg.render(), cap)


def training_chart(rep: dict[str, Any]) -> Chart:
    rows = [r for r in rep.get("training_curve") or [] if isinstance(r.get("loss"), (int, float))]
    title = "Training loss per epoch"
    if not rows:
        return Chart("training", title, None, "Training curves: nothing trained (no distill or prune stage "
                     "with epochs, and quantize ran no QAT).")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    pw, ph = 220, 170
    w = 30 + len(stages) * (pw + 70)
    svg = Svg(max(w, 320), 290, title)
    svg.text(12, 20, title, size=14, weight="bold")
    for k, stage in enumerate(stages):
        pts = [(r["epoch"], r["loss"]) for r in rows if r["stage"] == stage]
        xs = [e for e, _ in pts]
        p = Panel(svg, 70 + k * (pw + 70), 60, pw, ph, (min(xs) - 0.5, max(xs) + 0.5) if len(xs) > 1 else
                   (min(xs) - 1, max(xs) + 1), span([v for _, v in pts]))
        p.axes(xlabel="epoch", ylabel="mean loss" if k == 0 else "")
        colour = STAGE_COLORS[k % len(STAGE_COLORS)]
        svg.text(p.x0 + pw / 2, 50, stage, size=12, anchor="middle", weight="bold", fill=colour)
        svg.polyline([(p.X(e), p.Y(v)) for e, v in pts], stroke=colour)
        for e, v in pts:
            svg.circle(p.X(e), p.Y(v), 3, fill=colour, tip=f"{stage} epoch {e}: {v:.4f}")
    cap = "Mean training loss of each epoch: " + "; ".join(
        f"{s} {len([r for r in rows if r['stage'] == s])} epoch(s)" for s in stages) + "."
    return Chart("training", title, svg.render(), cap)


def charts(rep: dict[str, Any]) -> list[Chart]:
    """The report's charts, in page order: a chart of the task's own takes the place of the shared chart of the
    same key (a detector's per-head sensitivity), and its others (a detector's precision-recall curves) follow
    the output error."""
    own = {c.key: c for c in report_task(rep).report_charts(rep)}  # a task's chart replaces the generic one
    shared = [own.pop(c.key, c) for c in (trials_chart(rep), sensitivity_chart(rep), output_error_chart(rep))]
    return [*shared, *own.values(), training_chart(rep)]


def write_charts(rep: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Each drawn chart as ``<out_dir>/<key>.svg``."""
    return [write_svg(c.svg, Path(out_dir) / f"{c.key}.svg") for c in charts(rep) if c.svg]


def _chart_html(c: Chart) -> str:
    esc = _html.escape
    if c.svg is None:
        return f'<p class="nochart" id="chart-{c.key}">{esc(c.caption)}</p>'
    return (f'<figure class="chart" id="chart-{c.key}">{c.svg}<figcaption>{esc(c.caption)}</figcaption>'
            "</figure>")


def gate_figure(value: Any) -> str:
    """A gate check's value or threshold as the page prints it: 4 significant digits, as the summary table
    rounds agreement and the KFP verdict rounds every figure."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _engines_html(rep: dict[str, Any]) -> str:
    """Per device class, whether its TensorRT engine was built and verified (and ships in the edge model),
    or why not."""
    esc = _html.escape
    engines = rep.get("engines") or {}
    if not engines:
        why = ("nothing was registered (the gate failed)" if not rep.get("registered") else
               "the recipe names no device class (engines.device_classes)")
        return f'<p class="noengine">No TensorRT engines: {esc(why)}.</p>'
    rows = "".join(f"<tr class={'ok' if status == STATUS_BUILT else 'bad'}><td>{esc(key)}</td>"
                   f"<td>{esc(status)}</td></tr>" for key, status in engines.items())
    return f'<table class="engines"><tr><th>device class</th><th>engine</th></tr>{rows}</table>'


def render_html(rep: dict[str, Any]) -> str:
    """A self-contained HTML page of the report: its charts are inline SVG, nothing is fetched. It ends
    with report.json itself, folded."""
    esc = _html.escape
    rows = summary_rows(rep)
    head = "".join(f"<th>{esc(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    checks = "".join(
        f"<tr class={'ok' if c['passed'] else 'bad'}><td>{esc(c['name'])}</td><td>{gate_figure(c['value'])}</td>"
        f"<td>{gate_figure(c['threshold'])}</td><td>{'pass' if c['passed'] else 'FAIL'}</td>"
        f"<td>{esc(c['detail'])}</td></tr>"
        for c in rep["gate"]["checks"])
    drops = drop_rows(rep)
    drops_html = "" if not drops else (
        '<table class="drops"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in drops[0]) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in drops[1:]) + "</table>"
        + ("" if rep["confidence"].get("gated") else
           "<p>The gate judged the point estimates; set its <code>confidence</code> to judge the intervals.</p>"))
    reg = rep["registered"]
    reg_html = (f"{esc(reg['name'])} version {esc(str(reg['version']))} with alias {esc(reg['alias'])}"
                if reg else "nothing: the gate failed")
    figures = "\n".join(_chart_html(c) for c in charts(rep))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgeslim report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.ok{{background:#e8f5e9}}.bad{{background:#ffebee}}
td:first-child,th:first-child,table.engines td{{text-align:left}}pre{{background:#f5f5f5;padding:1em;overflow:auto}}
details{{margin:1em 0}}summary{{cursor:pointer;font-weight:bold}}figure.chart{{margin:1.5em 0}}
figure.chart svg{{max-width:100%;height:auto;border:1px solid #eee}}
figcaption{{color:#555;font-size:0.9em;max-width:60em}}
p.nochart{{color:#555;font-style:italic}}</style></head><body>
<h1>edgeslim report: {esc(rep['source']['name'])} v{esc(str(rep['source']['version']))}</h1>
<p>Source <code>{esc(rep['source']['uri'])}</code>, recipe {esc(rep['recipe_hash'])}, edgeslim {esc(rep['edgeslim_version'])}.</p>
<table class="summary"><tr>{head}</tr>{body}</table>
<h2>Gate: {'passed' if rep['gate']['passed'] else 'FAILED'}</h2>
<table class="gate"><tr><th>check</th><th>value</th><th>threshold</th><th>result</th><th>detail</th></tr>{checks}</table>
{drops_html}
<h2>Registered</h2><p>{reg_html}</p>
<h2>Engines</h2>
{_engines_html(rep)}
<h2>Charts</h2>
{figures}
<p><em>{esc(CPU_INT8_NOTE)}</em></p>
<h2>Full report</h2>
<details id="report-json"><summary>report.json</summary><pre>{esc(json.dumps(rep, indent=2))}</pre></details>
</body></html>"""


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
                                "candidate_metric": rep["candidate"]["metric"],
                                **{f"{d['name']}_{end}": d["test"][end] for d in (rep.get("confidence") or {})
                                   .get("drops", []) for end in ("low", "high")}})
            log_all(run.info.run_id, curves=True)
        _tag_quantize_run(client, rep, {"edgeslim.compression_run_id": run.info.run_id})


def _tag_quantize_run(client, rep: dict[str, Any], tags: dict[str, str]) -> None:
    qid = (rep.get("runs") or {}).get("quantize")
    if qid:
        for k, v in tags.items():
            client.set_tag(qid, k, v)
