"""report.html's charts: inline SVG drawn from the report's own data, one line where data is absent,
the figures the evaluate task measures for them (output error, precision-recall), the training curves
the tasks record, and the KFP outputs (Metrics, the gate's Markdown)."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeslim.components import report as R
from edgeslim.components import report_render as V
from edgeslim.components.common import charts as C
from edgeslim.components.common.output_error import output_error
from edgeslim.components.common.tasks import task_from_dict
from edgeslim.components.tasks.detection import report as D

SVG = "{http://www.w3.org/2000/svg}"


DETECTION_TASK = {"kind": "detection", "num_classes": 2, "decoder": {"heads": [{"box": "b", "cls": "c", "stride": 8}]}}


def _recipe(detection=False):
    return SimpleNamespace(digest=lambda: "abc123", source="models:/tiny/1",
                           task=task_from_dict(DETECTION_TASK if detection else None))


def _trial(i, kind, cal, metric, size, passed, floats=()):
    return {"trial": i, "kind": kind, "calibrator": cal, "float_layers": list(floats), "model": f"/t/{i}.onnx",
            "size_bytes": size, "seconds": 0.1, "metric": metric, "metric_drop": 99.0 - metric,
            "top1_agreement": 0.99, "sqnr_db": 30.0 + i, "passed": passed, "gate": "x", "mlflow_run_id": None}


SEARCH = {
    "size_bytes": 215_000, "chosen_on": "val", "reason": "trial 3 ...",
    "trials": [_trial(1, "ptq", "minmax", 95.1, 214_000, False), _trial(2, "ptq", "entropy", 96.0, 214_000, False),
               _trial(3, "fallback", "entropy", 98.6, 230_000, True, ["/c1/Conv"])],
    "sensitivity": {"split": "val", "fp32_metric": 99.0, "calibrator": "entropy", "layers": [
        {"node": "/c1/Conv", "layer": "features.0", "op": "Conv", "metric": 96.0, "metric_drop": 3.0,
         "sqnr_db": 18.0, "rank": 1},
        {"node": "/fc/Gemm", "layer": "classifier", "op": "Gemm", "metric": 99.0, "metric_drop": 0.0,
         "sqnr_db": float("inf"), "rank": 2}]},
}
SEARCH["winner"] = SEARCH["trials"][2]
PTQ = {"size_bytes": 214_000, "calibrator": "percentile", "float_layers": [], "zero_points_all_zero": True}


def _evaluation(figures=None, detection=False, counted=True):
    src = {"metric": 99.0, "size_bytes": 900_000, "latency_ms": {"batch_1": 0.2},
           **({"macs": 4_200_000, "params": 210_000} if counted else {})}
    cand = {"metric": 98.6, "size_bytes": 215_000, "latency_ms": {"batch_1": 0.3}, "size_ratio": 4.2,
            "fidelity": {"top1_agreement": 0.99, "sqnr_db": 31.0, "quantization_sqnr_db": 31.0},
            **({"macs": 1_400_000, "params": 52_500} if counted else {})}
    if detection:
        det = {"map50_95": 60.0, "mean_tp_score": 0.8, "recall": 90.0, "precision": 88.0, "map50": 95.0,
               "per_class_ap50": {"0": 95.0}}
        src["detection"] = det
        cand["detection"] = {**det, "map50": 94.0}
        cand["fidelity"]["detection_agreement"] = 0.97
    return {"metric_name": "map50" if detection else "top1", "test_samples": 10, "source": src, "candidate": cand,
            **({"figures": figures} if figures is not None else {})}


def report(quantized=SEARCH, figures=None, detection=False, curve=(), qat_curve=(), counted=True, engines=None):
    verdict = {"passed": True, "summary": "passed: ok",
               "checks": [{"name": "metric_drop", "value": 0.4, "threshold": 1.0, "passed": True, "detail": "d"}]}
    return R.build_report(
        recipe=_recipe(detection), parent={"name": "tiny", "version": "1"}, parent_export={"seconds": 1.0},
        transform={"stages": [], "seconds": 0.0, "training_curve": list(curve)},
        quantized={**quantized, "seconds": 1.0, "training_curve": list(qat_curve), "mlflow_run_id": "q1"},
        evaluation=_evaluation(figures, detection, counted), verdict=verdict,
        registered={"name": "tiny-edge", "version": "1", "alias": "edge-candidate", "run_id": "r1",
                    **({"engines": engines} if engines is not None else {})},
        onnx_path="/x.onnx", kfp_run={"run_id": "k1"})


def _svg(chart) -> ET.Element:
    root = ET.fromstring(chart.svg)  # well-formed XML, so the standalone .svg files open anywhere
    assert root.tag == SVG + "svg" and float(root.get("width")) > 0 and float(root.get("height")) > 0
    return root


def test_the_trials_chart_has_a_dot_and_a_size_bar_per_trial_and_rings_the_chosen_one():
    c = V.trials_chart(report())
    root = _svg(c)
    dots = [e for e in root.iter(SVG + "circle") if e.get("r") == "6"]
    assert len(dots) == 3
    assert [d.get("fill") for d in dots] == [C.FAIL, C.FAIL, C.PASS]
    assert len([e for e in root.iter(SVG + "circle") if e.get("fill") == "none"]) == 1 + 1  # chosen + legend ring
    bars = [e for e in root.iter(SVG + "rect") if e.find(SVG + "title") is not None]
    assert len(bars) == 3 and float(bars[2].get("height")) > float(bars[0].get("height")) > 0  # 230 kB > 214 kB
    texts = " ".join(t.text or "" for t in root.iter(SVG + "text"))
    assert "3: fallback" in texts and "+1 float" in texts and "98.6" in texts
    assert "trial 3 was chosen" in c.caption


def test_the_sensitivity_chart_ranks_layers_and_caps_an_exact_layers_infinite_sqnr():
    c = V.sensitivity_chart(report())
    root = _svg(c)
    bars = [e for e in root.iter(SVG + "rect") if e.find(SVG + "title") is not None]
    assert len(bars) == 4  # 2 layers x (drop, SQNR)
    assert all(math.isfinite(float(b.get("width"))) for b in bars)
    assert "features.0" in [t.text for t in root.iter(SVG + "text")]


def test_a_detectors_head_sensitivity_is_drawn_too():
    q = {**SEARCH, "sensitivity": None, "head_sensitivity": [
        {"output": "output_1", "nodes": ["a"], "map50": 80.0, "mean_tp_score": 0.2, "recall": 40.0, "damage": 75.0},
        {"output": "output_0", "nodes": ["b"], "map50": 95.0, "mean_tp_score": 0.8, "recall": 90.0, "damage": 1.0}]}
    # the detection task's chart takes the shared sensitivity chart's place
    c = {c.key: c for c in V.charts(report(q, detection=True))}["sensitivity"]
    assert c.title == "Per-head int8 sensitivity" and "output_1" in c.svg


def test_absent_data_is_one_line_and_never_an_empty_chart():
    rep = report(PTQ)
    cs = {c.key: c for c in V.charts(rep)}
    assert list(cs) == ["trials", "sensitivity", "output-error", "training"]  # a classifier has no PR chart
    assert cs["trials"].svg is None and cs["trials"].caption.startswith(
        "No search trials: quantize method ptq (one calibration, no search) with the percentile calibrator")
    assert cs["sensitivity"].svg is None and "only the accuracy-aware search" in cs["sensitivity"].caption
    assert cs["output-error"].svg is None and "recorded no figures" in cs["output-error"].caption
    assert cs["training"].svg is None and cs["training"].caption.startswith("Training curves: nothing trained")
    html = V.render_html(rep)
    for key, c in cs.items():
        assert f'<p class="nochart" id="chart-{key}">{c.caption}</p>' in html
    assert "<svg" not in html
    # the search passed at its first trial: nothing was ranked, and the line says why
    first = {**SEARCH, "trials": SEARCH["trials"][:1], "winner": SEARCH["trials"][0], "sensitivity": None}
    assert "PTQ trial 1 passed, so no layer had to be ranked" in V.sensitivity_chart(report(first)).caption
    # an evaluate task that failed to measure says so
    assert "(ValueError: boom)" in V.output_error_chart(report(figures={"error": "ValueError: boom"})).caption


def _onnx_linear(path: Path, w: np.ndarray, b: np.ndarray, outputs: int = 1) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, outs, inits = [], [], [numpy_helper.from_array(w.astype(np.float32), "W"),
                                  numpy_helper.from_array(b.astype(np.float32), "B")]
    nodes.append(helper.make_node("Gemm", ["input", "W", "B"], ["output_0" if outputs > 1 else "output"], name="fc"))
    outs.append(helper.make_tensor_value_info("output_0" if outputs > 1 else "output", TensorProto.FLOAT,
                                              ["batch", w.shape[1]]))
    if outputs > 1:
        inits.append(numpy_helper.from_array(np.float32([3.0]), "k"))
        nodes.append(helper.make_node("Mul", ["output_0", "k"], ["output_1"], name="scale"))
        outs.append(helper.make_tensor_value_info("output_1", TensorProto.FLOAT, ["batch", w.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         ["batch", w.shape[0]])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_output_error_is_measured_per_output_against_the_fp32_model(tmp_path):
    from edgeslim.components.common.onnx_runtime import sqnr_db

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(16, 10)), rng.normal(size=10)
    noise = rng.normal(scale=0.05, size=w.shape)
    parent = _onnx_linear(tmp_path / "parent.onnx", w, b, outputs=2)
    cand = _onnx_linear(tmp_path / "cand.onnx", w + noise, b, outputs=2)
    data = SimpleNamespace(x_test=rng.normal(size=(600, 16)).astype(np.float32))
    fig = output_error(cand, parent_onnx=parent, data=data)
    ref = data.x_test @ w + b
    got = data.x_test @ (w + noise) + b
    assert [o["name"] for o in fig["outputs"]] == ["output_0", "output_1"]
    for o in fig["outputs"]:  # SQNR is exact (not from the sample); output_1 = 3 x output_0 has the same
        assert o["sqnr_db"] == pytest.approx(sqnr_db(ref, got), abs=1e-3) and o["values"] == 6000
    h = fig["histogram"]
    assert sum(h["counts"]) + h["outside"] == h["sampled"] and h["total"] == 12_000
    assert len(h["edges"]) == len(h["counts"]) + 1 and h["edges"][0] == -h["edges"][-1]
    # in units of each output's RMS: the scaled output's errors land in the same bins
    assert fig["rms_error"] == pytest.approx(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)), rel=0.05)
    assert fig["reference"] == "the fp32 parent it was quantized from"
    student = output_error(cand, parent_onnx=parent, data=data, student_onnx=cand)
    assert student["reference"] == "the fp32 student it was quantized from" and student["outputs"][0]["sqnr_db"] is None
    rep = report(figures={"output_error": fig})
    c = V.output_error_chart(rep)
    root = _svg(c)
    assert len([e for e in root.iter(SVG + "rect") if e.find(SVG + "title") is not None]) == 41 + 2  # bins + outputs
    assert "output_1 " in c.caption and "SQNR" in c.caption


GT = [np.array([[0, 0, 10, 10, 0], [20, 20, 30, 30, 1]], np.float32), np.array([[5, 5, 25, 25, 1]], np.float32)]


def test_the_pr_curve_pools_classes_and_ends_at_the_recall_map_counts():
    from edgeslim.components.tasks.detection.evaluate import detection_metrics, pr_curve

    perfect = [np.hstack([g[:, :4], np.full((len(g), 1), 0.9), g[:, 4:5]]) for g in GT]
    c = pr_curve(perfect, GT, 2, 0.25)
    assert c["recall"][-1] == 1.0 and set(c["precision"]) == {1.0} and c["ground_truth"] == 3
    assert c["at_threshold"] == {"recall": 1.0, "precision": 1.0}
    # a duplicate of class 1 on a class-0 box is a false positive; a low-score miss lies under the threshold
    preds = [np.vstack([perfect[0], [[0, 0, 10, 10, 0.95, 1]]]), np.array([[5, 5, 25, 25, 0.1, 1]], np.float32)]
    c = pr_curve(preds, GT, 2, 0.25)
    m = detection_metrics(preds, GT, 2, 0.25)
    assert c["recall"][-1] == pytest.approx(m["true_positives"] / m["ground_truth"])
    assert c["precision"][0] == 0.0  # the top-scored detection is the false positive
    assert c["at_threshold"] == {"recall": pytest.approx(2 / 3, abs=1e-4), "precision": pytest.approx(2 / 3, abs=1e-4)}
    empty = pr_curve([np.zeros((0, 6))] * 2, GT, 2, 0.25)
    assert empty["recall"] == [] and empty["at_threshold"] is None


def test_a_detector_gets_pr_curves_of_fp32_and_int8_from_a_real_model(tmp_path):
    import torch

    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.reference.detector import DigitsDetector, default_heads, make_detection_splits

    data = make_detection_splits(seed=0, n_train=8, n_val=4, n_test=6)
    torch.manual_seed(0)
    model = DigitsDetector(width=8, head_hidden=8).eval()
    with torch.no_grad():
        model.head[0].cls[1].bias.fill_(0.5)
    fp32 = export(model, OnnxExportConfig(), data=data, out_path=tmp_path / "det.onnx").model
    int8 = quantize(fp32, PTQQuantizeConfig(num_samples=8), data=data, out_dir=tmp_path / "q").model
    task = task_from_dict({"kind": "detection", "num_classes": 10, "decoder": {"heads": default_heads(),
                                                                               "max_detections": 5}})
    figs = D.figures(int8, parent_onnx=fp32, data=data, task=task)
    assert set(figs["pr"]) == {"fp32", "int8"}
    assert figs["pr"]["fp32"]["ground_truth"] == sum(len(y) for y in data.y_test)
    assert [o["name"] for o in figs["output_error"]["outputs"]] == [f"output_{i}" for i in range(6)]
    # an untrained detector: some outputs come through int8 exactly (None: no error at all)
    dbs = [o["sqnr_db"] for o in figs["output_error"]["outputs"]]
    assert any(dbs) and all(d is None or d > 20 for d in dbs)
    json.dumps(figs)  # what the evaluate task writes
    pr = {k: {**v, "recall": [0.0, 0.5, 0.8], "precision": [1.0, 0.9, 0.6], "at_threshold":
              {"recall": 0.5, "precision": 0.9}} for k, v in figs["pr"].items()}
    c = D.pr_chart(report(figures={**figs, "pr": pr}, detection=True))
    root = _svg(c)
    lines = list(root.iter(SVG + "polyline"))
    assert [ln.get("stroke") for ln in lines] == [C.FP32, C.INT8] and len(lines[0].get("points").split()) == 3
    assert "pooled" in c.caption
    assert D.pr_chart(report(detection=True)).svg is None  # a detector without curves: one line
    # the report draws the task's own charts: a detector's curves after the output error; a classifier has none
    assert [c.key for c in V.charts(report(detection=True))] == ["trials", "sensitivity", "output-error", "pr",
                                                                  "training"]
    assert "pr" not in [c.key for c in V.charts(report())]


def test_training_curves_one_panel_per_stage():
    curve = [{"stage": "distill", "epoch": e, "loss": 2.0 / e} for e in (1, 2, 3)] + \
            [{"stage": "prune", "epoch": e, "loss": 0.5 - 0.1 * e} for e in (1, 2)]
    rep = report(curve=curve, qat_curve=[{"stage": "qat", "epoch": 1, "loss": 0.3}])
    assert [r["stage"] for r in rep["training_curve"]] == ["distill"] * 3 + ["prune"] * 2 + ["qat"]
    assert "training_curve" not in rep["transform"] and "training_curve" not in rep["candidate"]["quantization"]
    c = V.training_chart(rep)
    root = _svg(c)
    assert [ln.get("points").count(",") for ln in root.iter(SVG + "polyline")] == [3, 2, 1]
    assert "distill 3 epoch(s); prune 2 epoch(s); qat 1 epoch(s)" in c.caption
    metrics = V._curve_metrics(rep)
    assert [(m.key, m.step) for m in metrics][:4] == [("train.distill.loss", 1), ("train.distill.loss", 2),
                                                      ("train.distill.loss", 3), ("train.prune.loss", 1)]
    assert V.link_tags(rep) == {"edgeslim.quantize_run_id": "q1", "edgeslim.kfp_run_id": "k1"}


def test_fit_reports_the_mean_loss_of_every_epoch():
    import torch

    from edgeslim.components.transform.train import _EPOCH_LISTENERS, TrainConfig, epoch_losses, fit

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    seen, last = [], []
    with epoch_losses(lambda e, n, loss: seen.append((e, n))) as losses:
        fit(torch.nn.Linear(4, 2), TrainConfig(epochs=3, lr=0.05, batch_size=16), x=x, y=y,
            progress=lambda e, n, l: last.append(l))
        fit(torch.nn.Linear(4, 2), TrainConfig(epochs=2, lr=0.05, batch_size=16), x=x, y=y)
    assert seen == [(1, 3), (2, 3), (3, 3), (1, 2), (2, 2)] and len(losses) == 5
    assert losses[2] < losses[0]  # it learns
    assert losses[:3] == last     # the progress line prints the figure the curve records and MLflow logs
    assert not _EPOCH_LISTENERS   # nothing stays hooked after the block


def test_an_epochs_loss_is_the_mean_loss_per_sample_over_the_epoch():
    import torch

    from edgeslim.components.transform.train import TrainConfig, epoch_losses, fit

    torch.manual_seed(0)
    x = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.int64)
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    printed = []
    with epoch_losses() as losses:  # lr 0: the weights stay, so every epoch's loss is the same known figure
        fit(model, TrainConfig(epochs=2, lr=0.0, batch_size=16, schedule="constant", weight_decay=0.0), x=x, y=y,
            progress=lambda e, n, l: printed.append(l))
    # batches of 16, 16 and 8 samples: their mean losses weighted by size, not averaged as three equals
    assert losses == printed and losses == pytest.approx([want, want], rel=1e-6)


def test_the_html_is_self_contained_and_every_drawn_chart_is_a_standalone_svg(tmp_path):
    curve = [{"stage": "distill", "epoch": e, "loss": 1.0 / e} for e in (1, 2)]
    fig = {"output_error": {"reference": "the fp32 parent it was quantized from", "unit": "RMS of the fp32 output",
                            "outputs": [{"name": "output", "sqnr_db": 31.0, "rms": 1.0, "values": 100}],
                            "histogram": {"edges": list(np.linspace(-1, 1, 42)), "counts": [1] * 41, "outside": 0,
                                          "sampled": 41, "total": 100}, "rms_error": 0.03, "max_abs_error": 0.9}}
    rep = report(figures=fig, curve=curve)
    html = V.render_html(rep)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert html.count('<figure class="chart"') == 4 and html.count("<svg") == 4
    paths = V.write_charts(rep, tmp_path / "charts")
    assert sorted(p.name for p in paths) == ["output-error.svg", "sensitivity.svg", "training.svg", "trials.svg"]
    for p in paths:
        assert ET.parse(p).getroot().tag == SVG + "svg"


def test_macs_and_parameters_of_both_are_in_the_summary_table_and_the_registrys_metrics():
    from edgeslim.components.register import _flat_metrics

    rep = report()
    rows = {r[0]: r[1:] for r in R.summary_rows(rep)}
    assert rows["MACs per sample"] == ("4,200,000", "1,400,000", "3.00x fewer")
    assert rows["parameters"] == ("210,000", "52,500", "4.00x fewer")
    labels = [r[0] for r in R.summary_rows(rep)]
    assert labels.index("size (bytes)") + 1 == labels.index("MACs per sample")  # after size, before latency
    assert re.search(r"^MACs per sample +4,200,000 +1,400,000 +3.00x fewer$", V.format_table(rep), re.M)
    assert "<td>MACs per sample</td><td>4,200,000</td><td>1,400,000</td><td>3.00x fewer</td>" in V.render_html(rep)
    flat = _flat_metrics(_evaluation())
    assert (flat["source_macs"], flat["candidate_macs"]) == (4_200_000.0, 1_400_000.0)
    assert (flat["source_params"], flat["candidate_params"]) == (210_000.0, 52_500.0)
    # a model the counter could not run: no row, no metric (never a made-up 0)
    bare = report(counted=False)
    assert not {"MACs per sample", "parameters"} & {r[0] for r in R.summary_rows(bare)}
    assert bare["source"]["macs"] is None and "source_macs" not in _flat_metrics(_evaluation(counted=False))


def test_the_page_rounds_the_gate_shows_each_engine_and_folds_the_json():
    rep = report(engines={"orin-sm87": "built and verified", "t4-sm75": "not built: no CUDA device on this node"})
    rep["gate"]["checks"].append({"name": "top1_agreement", "value": 0.9944444444444445, "threshold": 0.97,
                                  "passed": True, "detail": "top-1 agreement with the parent 0.9944"})
    html = V.render_html(rep)
    assert "<td>top1_agreement</td><td>0.9944</td><td>0.97</td>" in html and "0.99444" not in html.split("<details")[0]
    assert ('<tr class=ok><td>orin-sm87</td><td>built and verified</td></tr>'
            '<tr class=bad><td>t4-sm75</td><td>not built: no CUDA device on this node</td></tr>') in html
    # the raw report is the page's last element, folded under its file name
    fold = html.index('<details id="report-json"><summary>report.json</summary><pre>')
    assert html.count("<pre>") == 1 and html.index("<pre>") > fold
    assert html[fold:].rstrip().endswith("</pre></details>\n</body></html>")
    assert "&quot;edgeslim_version&quot;" in html[fold:] and "edgeslim_version" not in html[:fold]
    assert "No TensorRT engines: the recipe names no device class" in V.render_html(report())
    rejected = {**report(), "registered": None}
    assert "No TensorRT engines: nothing was registered (the gate failed)" in V.render_html(rejected)


def test_register_gives_the_edge_model_a_signature_and_a_description(tmp_path):
    from edgeslim.components.register import edge_requirements, onnx_signature, version_description

    path = _onnx_linear(tmp_path / "m.onnx", np.ones((16, 10)), np.zeros(10))
    sig = onnx_signature(path).to_dict()
    assert json.loads(sig["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 16]},
                                          "name": "input"}]
    assert json.loads(sig["outputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 10]}
    reqs = edge_requirements()
    assert [r.split("==")[0] for r in reqs] == ["edgeslim", "onnxruntime", "numpy"]
    ev = _evaluation()
    text = version_description(parent={"name": "tiny", "version": "3"}, recipe_hash="abc123",
                               gate_result={"passed": True, "summary": "passed: fine"}, evaluation=ev,
                               metric_label="top-1")
    assert text.startswith("int8 Q/DQ ONNX (edgeslim ") and "models:/tiny/3, recipe abc123" in text
    assert "Gate: passed, passed: fine" in text
    assert "top-1 on the test split: 99.00% -> 98.60% (-0.40 pt); size 900,000 B -> 215,000 B (4.2x smaller)" in text


def _art(tmp_path, name, content=None):
    p = tmp_path / name
    if content is not None:
        p.write_text(json.dumps(content))
    return SimpleNamespace(path=str(p), uri=str(p), metadata={})


class _Metrics:
    def __init__(self):
        self.metadata = {}

    def log_metric(self, k, v):
        assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
        self.metadata[k] = v


def test_the_gate_task_writes_its_verdict_as_markdown(tmp_path, monkeypatch):
    from edgeslim.components.kfp.ops import gate_op
    from edgeslim.components.recipe import load_recipe
    from edgeslim.pipelines.demo import DEMO_RECIPE

    ev = _evaluation()
    ev["candidate"]["metric"] = 90.0
    md = _art(tmp_path, "md")
    passed = gate_op(load_recipe(DEMO_RECIPE).to_json(), _art(tmp_path, "ev.json", ev), _art(tmp_path, "v"), md)
    text = Path(md.path).read_text()
    assert passed is False and text.startswith("## Gate: FAILED\n\nfailed: metric_drop missed by")
    assert "| check | value | threshold | result | detail |" in text and "| metric_drop | 9 | " in text
    assert "**FAIL**" in text and text.count("\n| ") == 4  # header + 3 checks


def test_the_output_error_sample_stays_bounded_however_long_the_split():
    from edgeslim.components.common.output_error import OutputError

    rng = np.random.default_rng(0)
    err = OutputError(cap=1_000, per_batch=400)
    for _ in range(50):  # 50 batches of 4,000 values in two outputs: 400 sampled from each, 20,000 in all
        refs = [rng.normal(size=3_000).astype(np.float32), rng.normal(size=1_000).astype(np.float32)]
        err.add((refs, ["y", "z"]), ([r + rng.normal(scale=0.01, size=r.size).astype(np.float32) for r in refs],
                                     ["y", "z"]))
    kept = {k: sum(part.size for part in v) for k, v in err.samples.items()}
    assert sum(kept.values()) <= 2_000  # over all outputs, however many
    assert 2.5 < kept["y"] / kept["z"] < 3.5  # each output keeps its share of the values
    out = err.result("fp32")["outputs"][0]
    assert out["name"] == "y" and 35 < out["sqnr_db"] < 45  # the SQNR still counts every value (about 40 dB)
