"""report.html in a real browser: headless Chromium (Debian's `chromium`) renders every chart with a
non-zero size, and the page fetches nothing (Chromium's own network log, every request of the page).

Without Chromium these tests skip with the reason, except under ``CI=true``, where they fail:
`bash tests/setup-machine.sh` (the README's test command) installs it.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# Measures what the browser drew, into the DOM that --dump-dom prints (added to a copy of the page).
MEASURE = """<script>(function () {
  const charts = Array.from(document.querySelectorAll("figure.chart")).map(function (f) {
    const svg = f.querySelector("svg"), box = svg.getBoundingClientRect(), content = svg.getBBox();
    const marks = Array.from(svg.querySelectorAll("rect, circle, polyline, line")).filter(function (e) {
      const b = e.getBBox(); return b.width > 0 || b.height > 0; }).length;
    return {id: f.id, ns: svg.namespaceURI, width: box.width, height: box.height,
            content: [content.width, content.height], marks: marks,
            texts: svg.querySelectorAll("text").length, caption: f.querySelector("figcaption").textContent};
  });
  const lines = Array.from(document.querySelectorAll("p.nochart")).map(function (p) {
    return {id: p.id, height: p.getBoundingClientRect().height, text: p.textContent}; });
  const fold = document.querySelector("details#report-json");
  const rows = function (sel) { return Array.from(document.querySelectorAll(sel + " tr")).slice(1).map(function (tr) {
    return Array.from(tr.cells).map(function (c) { return c.textContent; }); }); };
  const page = {
    fold: fold && {open: fold.open, summary: fold.querySelector("summary").getBoundingClientRect().height,
                   height: fold.getBoundingClientRect().height, shown: fold.querySelector("pre").checkVisibility()},
    engines: rows("table.engines"), gate: rows("table.gate"), summary: rows("table.summary")};
  document.body.setAttribute("data-charts", JSON.stringify(charts));
  document.body.setAttribute("data-lines", JSON.stringify(lines));
  document.body.setAttribute("data-page", JSON.stringify(page));
})();</script>"""

# Browser-internal requests (component updates, ...) have no origin: everything else came from the page.
BROWSER_OWN = "not an origin"


def chromium() -> str:
    """Chromium's path; skips without it, fails under CI=true (CI installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    why = "Chromium is not installed: `bash tests/setup-machine.sh` installs Debian's chromium"
    if os.environ.get("CI") == "true":
        pytest.fail(why + " (CI=true: the report's browser test must run)")
    pytest.skip(why)


def page_requests(netlog: Path) -> list[str]:
    """URLs the page asked the network stack for, from Chromium's NetLog (``--log-net-log``)."""
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except ValueError:  # cut short: keep the complete events
        log = json.loads(text[:text.rfind("},") + 1] + "]}")
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    return sorted({e["params"]["url"] for e in log["events"]
                   if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})
                   and e["params"].get("initiator") != BROWSER_OWN})


def open_in_chromium(page: Path, work: Path, *, screenshot: bool = True) -> dict:
    """Load ``page`` (a copy with :data:`MEASURE` added) in headless Chromium with every host name
    unresolvable; return the measured charts, the one-line notes, the ``page`` (the folded report.json:
    open or not, heights, whether its text shows; the text of the engine, gate and summary tables' rows), the page's network requests
    and (``screenshot``) a PNG of it."""
    exe = chromium()
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "measured.html"
    copy.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    netlog = work / "netlog.json"
    common = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-default-apps", "--hide-scrollbars", f"--user-data-dir={work / 'profile'}",
              "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,2400", "--virtual-time-budget=5000"]
    proc = subprocess.run([*common, f"--log-net-log={netlog}", "--dump-dom", copy.as_uri()],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout).group(0)
    attrs = {k: json.loads(html.unescape(v)) for k, v in re.findall(r'data-(charts|lines|page)="([^"]*)"', body)}
    assert set(attrs) == {"charts", "lines", "page"}, "the measuring script did not run:\n" + proc.stderr[-2000:]
    shot = None
    if screenshot:
        shot = work / "report.png"
        subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=900)
    return {**attrs, "requests": page_requests(netlog), "screenshot": shot}


def assert_renders_offline(page: Path, work: Path, expect_charts: set[str]) -> dict:
    """Every chart of ``page`` is an SVG the browser laid out with a non-zero size and drawn marks;
    every note is a visible line; nothing was fetched, and nothing in the page points outside."""
    text = page.read_text()
    assert not re.search(r"""\b(src|href|action|poster|data)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"<(script|link|img|iframe|object|embed|audio|video)\b", text, re.I)
    assert "url(" not in text and "@import" not in text
    seen = open_in_chromium(page, work)
    charts = {c["id"]: c for c in seen["charts"]}
    assert set(charts) == {f"chart-{k}" for k in expect_charts}
    for c in charts.values():
        assert c["ns"] == "http://www.w3.org/2000/svg", c  # parsed as SVG, not as unknown HTML tags
        assert c["width"] >= 300 and c["height"] >= 150, c
        assert c["content"][0] > 100 and c["content"][1] > 100, c
        assert c["marks"] >= 5 and c["texts"] >= 5 and c["caption"], c
    for line in seen["lines"]:
        assert line["height"] > 0 and len(line["text"]) > 20, line
    assert seen["requests"] == [], f"the report fetched {seen['requests']}"
    return seen


def _full_report() -> dict:
    """A detector's report with every chart: search trials, head sensitivity, output error, PR curves
    and training curves (the figures as the tasks write them)."""
    from types import SimpleNamespace

    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.report import build_report

    rng = np.random.default_rng(0)
    trials = [{"trial": i, "kind": k, "calibrator": c, "float_layers": f, "size_bytes": s, "map50": m,
               "map50_95": m - 30, "mean_tp_score": 0.7, "recall": 80.0, "passed": p, "gate": "g"}
              for i, (k, c, f, s, m, p) in enumerate([("ptq", "entropy", [], 90_000, 70.0, False),
                                                      ("ptq", "percentile", [], 90_000, 88.0, False),
                                                      ("fallback", "percentile", ["/h/Conv"], 95_000, 93.5, True)], 1)]
    heads = [{"output": f"output_{i}", "nodes": [f"n{i}"], "map50": 90.0 - i, "mean_tp_score": 0.7,
              "recall": 80.0, "damage": float(20 - 3 * i)} for i in range(6)]
    edges = np.linspace(-0.2, 0.2, 42)
    counts = np.histogram(rng.normal(scale=0.04, size=5000), bins=edges)[0]
    recall = np.linspace(0, 0.9, 50)
    curve = lambda shift: {"iou": 0.5, "ground_truth": 200, "detections": 400, "score_threshold": 0.25,  # noqa: E731
                           "recall": list(recall - shift), "precision": list(1 - 0.4 * recall ** 2),
                           "at_threshold": {"recall": 0.8 - shift, "precision": 0.75}}
    figures = {"output_error": {"reference": "the fp32 parent it was quantized from", "unit": "RMS of the fp32 output",
                                "outputs": [{"name": f"output_{i}", "sqnr_db": 25.0 + i, "rms": 1.0, "values": 900}
                                            for i in range(6)],
                                "histogram": {"edges": list(edges), "counts": [int(c) for c in counts],
                                              "outside": 0, "sampled": 5000, "total": 5400},
                                "rms_error": 0.04, "max_abs_error": 0.19},
               "pr": {"fp32": curve(0.0), "int8": curve(0.02)}}
    det = {"map50": 95.0, "map50_95": 60.0, "mean_tp_score": 0.8, "recall": 90.0, "precision": 85.0,
           "per_class_ap50": {"0": 95.0}}
    evaluation = {"metric_name": "map50", "test_samples": 64, "figures": figures,
                  "source": {"metric": 95.0, "size_bytes": 300_000, "latency_ms": {"batch_1": 1.0}, "detection": det,
                             "macs": 12_000_000, "params": 75_000},
                  "candidate": {"metric": 93.5, "size_bytes": 95_000, "latency_ms": {"batch_1": 2.0},
                                "macs": 7_200_000, "params": 45_000,
                                "size_ratio": 3.2, "detection": {**det, "map50": 93.5},
                                "fidelity": {"detection_agreement": 0.95, "top1_agreement": 0.95, "sqnr_db": 30.0}}}
    return build_report(
        recipe=SimpleNamespace(digest=lambda: "abc", source="models:/det/1", task=task_from_dict(
            {"kind": "detection", "num_classes": 2, "decoder": {"heads": [{"box": "b", "cls": "c", "stride": 8}]}})),
        parent={"name": "det", "version": "1"},
        parent_export={}, evaluation=evaluation,
        transform={"stages": [],
                   "training_curve": [{"stage": "distill", "epoch": e, "loss": 1.0 / e} for e in range(1, 6)]},
        quantized={"trials": trials, "winner": trials[2], "head_sensitivity": heads, "size_bytes": 95_000,
                   "training_curve": [{"stage": "qat", "epoch": e, "loss": 0.5 - 0.1 * e} for e in (1, 2)]},
        verdict={"passed": True, "summary": "passed", "checks": [
            {"name": "map50_drop", "value": 1.5, "threshold": 2.0, "passed": True, "detail": "d"},
            {"name": "detection_agreement", "value": 0.9444444444444444, "threshold": 0.9, "passed": True,
             "detail": "a"}]},
        registered={"name": "det-edge", "version": "1", "alias": "edge-candidate",
                    "engines": {"orin-sm87-jp6.1-trt10.3": "built and verified",
                                "t4-sm75": "not built: no CUDA device on this node"}}, onnx_path="m.onnx")


def test_every_chart_of_a_detectors_report_renders_and_nothing_is_fetched(tmp_path):
    from edgeslim.components.report_render import render_html

    page = tmp_path / "report.html"
    page.write_text(render_html(_full_report()))
    seen = assert_renders_offline(page, tmp_path / "browser",
                                  {"trials", "sensitivity", "output-error", "pr", "training"})
    assert seen["lines"] == []
    assert seen["screenshot"].stat().st_size > 20_000  # a page with pictures, for a person to look at


def test_the_page_shows_macs_each_engine_and_the_rounded_gate_and_folds_report_json(tmp_path):
    from edgeslim.components.report_render import render_html

    page = tmp_path / "report.html"
    page.write_text(render_html(_full_report()))
    seen = open_in_chromium(page, tmp_path / "browser", screenshot=False)["page"]
    assert ["MACs per sample", "12,000,000", "7,200,000", "1.67x fewer"] in seen["summary"]
    assert ["parameters", "75,000", "45,000", "1.67x fewer"] in seen["summary"]
    assert [r[:3] for r in seen["gate"]] == [["map50_drop", "1.5", "2"], ["detection_agreement", "0.9444", "0.9"]]
    assert seen["engines"] == [["orin-sm87-jp6.1-trt10.3", "built and verified"],
                               ["t4-sm75", "not built: no CUDA device on this node"]]
    # report.json is there, folded: its summary line shows, its text is hidden and takes no room until opened
    fold = seen["fold"]
    assert fold["open"] is False and fold["shown"] is False and 0 < fold["summary"] <= fold["height"] < 40


def test_a_ptq_report_says_in_one_line_what_it_cannot_draw(tmp_path):
    from edgeslim.components.report_render import render_html

    rep = _full_report()
    rep["candidate"]["quantization"] = {"size_bytes": 95_000, "calibrator": "percentile"}
    rep["training_curve"] = []
    rep["figures"].pop("pr")
    page = tmp_path / "report.html"
    page.write_text(render_html(rep))
    seen = assert_renders_offline(page, tmp_path / "browser", {"output-error"})
    assert [ln["id"] for ln in seen["lines"]] == ["chart-trials", "chart-sensitivity", "chart-pr", "chart-training"]


def test_the_network_check_sees_a_page_that_fetches(tmp_path):
    """The check is not vacuous: a page that loads an image and a stylesheet from elsewhere is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!doctype html><html><head><link rel="stylesheet" href="https://cdn.example.com/x.css">'
                    '</head><body><img src="http://example.invalid/logo.png"></body></html>')
    seen = open_in_chromium(page, tmp_path / "browser", screenshot=False)
    assert seen["requests"] == ["http://example.invalid/logo.png", "https://cdn.example.com/x.css"]
