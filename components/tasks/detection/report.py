"""The detector's part of the report: the precision-recall curves of fp32 and int8 (measured by
:func:`figures`, drawn by :func:`charts`), and the rows of the figures the detection gate checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeslim.components.common.charts import BAR, FAIL, FP32, INT8, MUTED, Chart, Panel, Svg, bar_panels
from edgeslim.components.common.output_error import OutputError, reference_onnx
from edgeslim.components.common.tasks import fused_kernel_row
from edgeslim.components.tasks.detection.evaluate import detect_batches
from edgeslim.components.tasks.detection.records import DetectionRecorder, record_pr_curve


def figures(candidate_onnx: str | Path, *, parent_onnx: str | Path, data, task,
            student_onnx: str | Path | None = None) -> dict[str, Any]:
    """The int8 output error against its own fp32 model and the precision-recall curves of fp32 and int8, on
    the test split, in one pass of the models over it (a lazy split is read once)."""
    ref_path, reference = reference_onnx(parent_onnx=parent_onnx, student_onnx=student_onnx)
    own = ref_path != Path(parent_onnx)
    err = OutputError()
    paths = [parent_onnx, candidate_onnx, *([student_onnx] if own else [])]
    ref = 2 if own else 0
    recorders = [DetectionRecorder(task.num_classes, task.score_threshold) for _ in range(2)]

    def on_detections(start: int, dets) -> None:
        gts = list(data.y_test[start:start + len(dets[0])])
        for rec, d in zip(recorders, dets):
            rec.add(d, gts)

    detect_batches(paths, data.x_test, task, on_batch=lambda raw: err.add(raw[ref], raw[1]),
                   decode=[True, True, False][:len(paths)], on_detections=on_detections)
    return {"output_error": err.result(reference), "pr": {
        "fp32": record_pr_curve(recorders[0].records()), "int8": record_pr_curve(recorders[1].records())}}


def pr_chart(rep: dict[str, Any]) -> Chart:
    pr = (rep.get("figures") or {}).get("pr")
    title = "Precision-recall, fp32 and int8"
    if not pr:
        return Chart("pr", title, None, "Precision-recall curves: not recorded by the evaluate task.")
    if not any(pr[k]["recall"] for k in ("fp32", "int8")):
        return Chart("pr", title, None, "Precision-recall curves: no detections or no ground-truth boxes "
                     "in the test split.")
    svg = Svg(520, 400, title)
    svg.text(12, 20, title, size=14, weight="bold")
    p = Panel(svg, 64, 44, 300, 300, (0.0, 1.0), (0.0, 1.05))
    p.axes(xlabel="recall", ylabel="precision", xgrid=True)
    thr = pr["fp32"].get("score_threshold")
    for key, colour, dash in (("fp32", FP32, ""), ("int8", INT8, "6,3")):
        c = pr[key]
        svg.polyline([(p.X(r), p.Y(q)) for r, q in zip(c["recall"], c["precision"])], stroke=colour, dash=dash)
        if c.get("at_threshold"):
            a = c["at_threshold"]
            svg.circle(p.X(a["recall"]), p.Y(a["precision"]), 5, fill=colour, stroke="#ffffff", width=1.5,
                       tip=f"{key} at score >= {thr}: recall {a['recall']:.3f}, precision {a['precision']:.3f}")
    det = (rep["source"].get("detection") or {}), (rep["candidate"].get("detection") or {})
    svg.legend(380, 70, [("fp32", FP32, "line")])
    svg.legend(380, 90, [("int8", INT8, "dash")])
    svg.text(380, 116, f"mAP@0.5 {det[0].get('map50', float('nan')):.1f}%", size=10, fill=FP32)
    svg.text(380, 130, f"mAP@0.5 {det[1].get('map50', float('nan')):.1f}%", size=10, fill=INT8)
    svg.circle(385, 152, 5, fill=MUTED)
    svg.text(394, 156, f"score >= {thr:g}", size=10)
    cap = (f"Test split, IoU 0.5, all classes pooled ({pr['fp32']['ground_truth']:,} boxes); the dots are the "
           "deployment score threshold. mAP is the mean over classes, so it is not the area under these pooled curves.")
    return Chart("pr", title, svg.render(), cap)


def head_sensitivity_chart(rep: dict[str, Any], limit: int = 30) -> Chart | None:
    """The search's ranking of head groups for float fallback (None when the search ranked none)."""
    heads = (rep["candidate"].get("quantization") or {}).get("head_sensitivity")
    if not heads:
        return None
    title = "Per-head int8 sensitivity"
    series = [("damage when only this head is int8", "damage", FAIL, None), ("mAP@0.5 (%)", "map50", BAR, None)]
    cap = ("Damage = mAP@0.5 drop + 100 x mean true-positive score drop + recall drop (points), "
           "each head group alone in int8, on the validation split; most damaging on top.")
    return Chart("sensitivity", title, bar_panels(title, heads[:limit], "output", series), cap)


def charts(rep: dict[str, Any]) -> list[Chart]:
    heads = head_sensitivity_chart(rep)
    return [*([heads] if heads is not None else []), pr_chart(rep)]


def rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """mAP@0.5:0.95 and the score-calibration figures the detection gate checks."""
    cand = rep["candidate"]
    s, c = rep["source"].get("detection") or {}, cand.get("detection") or {}
    if not s or not c:
        return []
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
    rows += fused_kernel_row(cand, "mAP@0.5", rep.get("test_samples"))
    quant = cand.get("quantization") or {}
    ranges, floats = quant.get("ranges") or {}, set(quant.get("float_outputs") or [])
    outs = {k: v for k, v in ranges.items() if k.startswith("output")}
    if outs:
        rows.append(("calibrated amax of the outputs", "", ", ".join(
            f"{k} float" if k in floats else f"{k} {v:.3g}" for k, v in outs.items()),
            "float: not quantized (head kept in float, or placement: weighted)" if floats else ""))
    return rows
