"""Accuracy-aware int8 for detectors: the detection strategy of the one search (:mod:`.search`).

The classifier strategy judges trials by top-1; a detector needs the detection
gate (mAP *and* score calibration), and its sensitive spots are the head outputs:
a calibrator that clips the sigmoid class-score output collapses every confidence
(DESIGN.md). So the fallback here ranks *head groups* (each graph output with the
nodes that produce it, back to and including its last Conv) by what quantizing
only that group costs, and keeps the worst ones in float, one more per trial.

Trials are judged, and head groups ranked, on the validation split (choosing is
part of training; the pipeline's evaluate task then judges the winner on the
held-out test split).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common.data import Splits
from edgeslim.components.common.result import StageResult
from edgeslim.components.quantize.search import Strategy, search

# Nodes that pass a head's values through without weights of their own.
_PASS_THROUGH = {"Sigmoid", "Reshape", "Transpose", "Flatten", "Concat", "Identity", "Squeeze",
                 "Unsqueeze", "Softmax", "Mul", "Add", "Relu", "Clip"}


def head_groups(onnx_path: str | Path) -> list[dict[str, Any]]:
    """Per graph output, the node names from the output back to its last Conv/Gemm.

    Returns:
        ``[{"output": name, "nodes": [...], "conv": name}]`` in output order.
    """
    import onnx

    g = onnx.load(str(onnx_path)).graph
    producer = {o: n for n in g.node for o in n.output}
    groups = []
    for out in g.output:
        nodes, frontier, conv = [], [out.name], None
        while frontier and conv is None:
            t = frontier.pop()
            n = producer.get(t)
            if n is None:
                continue
            nodes.append(n.name)
            if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                conv = n.name
                break
            if n.op_type in _PASS_THROUGH:
                frontier.extend(i for i in n.input[:1] if i)
        if conv:
            groups.append({"output": out.name, "nodes": nodes, "conv": conv})
    return groups


class DetectorStrategy(Strategy):
    """The detection gate (mAP *and* score calibration) against the fp32 detector on val; the
    fallback keeps whole head groups (:func:`head_groups`) in float, the most damaging first."""

    task = "detection"
    candidate = "detector candidate"
    gate_name = "detection gate"
    group_noun = "head(s) producing"
    qat_note = " (weighted placement, matching the fp32 outputs)"
    fields = ("map50", "map50_95", "mean_tp_score", "recall")
    table_key = "head_sensitivity"

    def __init__(self, fp32_onnx: str | Path, task, *, model=None, export_config=None):
        self.fp32_onnx, self.task_config, self.model, self.export_config = fp32_onnx, task, model, export_config
        self.table: list[dict[str, Any]] = []

    def reference(self, data: Splits) -> dict[str, Any]:
        from edgeslim.components.tasks.detection import detection_metrics, onnx_detections

        dets, _, _ = onnx_detections(self.fp32_onnx, data.x_val, self.task_config, keep_outputs=False)
        self.parent = detection_metrics(dets, list(data.y_val), self.task_config.num_classes,
                                        self.task_config.score_threshold)
        return {"fp32_val": self.parent}

    def judge(self, candidate: str | Path, data: Splits) -> dict[str, Any]:
        from edgeslim.components.tasks.detection import detection_metrics, gate_detection, onnx_detections

        task = self.task_config
        dets, _, _ = onnx_detections(candidate, data.x_val, task, keep_outputs=False)
        m = detection_metrics(dets, list(data.y_val), task.num_classes, task.score_threshold)
        verdict = gate_detection({"source": {"detection": self.parent}, "candidate": {"detection": m}}, task.gate)
        return {"map50": m["map50"], "map50_95": m["map50_95"], "mean_tp_score": m["mean_tp_score"],
                "recall": m["recall"], "passed": verdict["passed"], "gate": verdict["summary"]}

    def damage(self, row: dict[str, Any]) -> float:
        # Points of mAP, plus the score drop on a 100-point scale, plus recall points.
        p = self.parent
        return ((p["map50"] - row["map50"]) + 100.0 * (p["mean_tp_score"] - row["mean_tp_score"])
                + (p["recall"] - row["recall"]))

    def key(self, row: dict[str, Any]) -> tuple:
        return row["passed"], -self.damage(row)

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned):
        # Sensitivity of each head group: only that group int8, everything else float.
        import onnx

        from edgeslim.components.quantize.ptq import quantize
        from edgeslim.components.quantize.sensitivity import preprocessed

        pre = preprocessed(fp32_onnx, out_dir / "pre.onnx")
        self.table = []
        all_nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.name]
        for i, grp in enumerate(head_groups(pre)):
            others = [n for n in all_nodes if n not in grp["nodes"]]
            # The fp32 graph (not ``pre``): the graph ``ranges`` were calibrated on; node names are the same.
            res = quantize(fp32_onnx, dataclasses.replace(config.ptq(calibrator), float_layers=others), data=data,
                           out_dir=out_dir / "heads" / f"group{i}", ranges=ranges)
            r = self.judge(res.model, data)
            self.table.append({**grp, **{k: r[k] for k in ("map50", "mean_tp_score", "recall")},
                               "damage": round(self.damage(r), 4)})
        self.table.sort(key=lambda r: -r["damage"])
        ranked = [r for r in self.table if r["damage"] > 0.0] or self.table
        return [{"label": r["output"], "nodes": r["nodes"]} for r in ranked]

    def qat(self, fp32_onnx, config, *, data, out_dir, calibrator, float_layers):
        if self.model is None:
            return None
        from edgeslim.components.quantize.detect_qat import qat_detector

        res = qat_detector(self.model, config, data=data, out_dir=out_dir, calibrator=calibrator,
                           float_layers=float_layers, export_config=self.export_config)
        return res, {"output_error_val": res.metrics["output_error_val"]}

    def figures(self, row):
        p = self.parent
        return (f"mAP@0.5 {row['map50']:.2f} vs fp32 {p['map50']:.2f}, mean TP score {row['mean_tp_score']:.3f} "
                f"vs {p['mean_tp_score']:.3f}")

    def fix(self, config, qat_ran):
        fix = ("raise quantize.max_float_layers" if config.max_float_layers < len(self.table) or not self.table
               else "loosen task.gate") + ", or try another calibrator"
        if not config.qat:
            return fix + ", or set quantize.qat: true"
        if not qat_ran:
            return fix + " (QAT was not tried: no torch model was given)"
        return fix + ", or raise quantize.qat_epochs"

    def result_metrics(self, row, res):
        return {"calibrator": row["calibrator"], "float_layers": res.metrics.get("float_layers", []),
                # outputs left in float (head fallback or placement "weighted"): range unused
                "float_outputs": res.metrics.get("float_outputs", []), "ranges": res.metrics.get("ranges", {}),
                **{k: res.metrics[k] for k in ("qdq_nodes", "per_channel_weights", "zero_points_all_zero")
                   if k in res.metrics}}


def quantize_detector_auto(fp32_onnx: str | Path, config, *, data: Splits, task, out_dir: str | Path,
                           model=None, export_config=None,
                           progress: Callable[[str], None] | None = None) -> StageResult:
    """The first int8 detector that passes the detection gate on the validation split (:func:`.search.search`).

    Args:
        fp32_onnx: the fp32 detector to quantize (the gate compares against it).
        config: an ``AccuracyAwareQuantizeConfig`` (calibrators, samples, ``max_float_layers``,
            ``float_layers`` pinned to float in every trial).
        data: calibration from train, trials judged on val.
        task: the recipe's ``DetectionTaskConfig`` (decoder and gate).
        out_dir: one folder per trial, ``autotune.json``.
        model: the torch detector ``fp32_onnx`` was exported from; with ``config.qat`` and
            no passing PTQ/fallback trial, QAT (:mod:`.detect_qat`) is the last trial.
        export_config: ONNX export settings for QAT's re-export.
        progress: called with one line per trial.

    Returns:
        StageResult whose model is the winning Q/DQ ONNX; metrics hold ``trials``,
        ``winner``, ``reason``, ``head_sensitivity`` and the winner's ``ranges``.

    Raises:
        GateRejected: no trial passed; the message names the best trial and what to change.
    """
    strategy = DetectorStrategy(fp32_onnx, task, model=model, export_config=export_config)
    return search(fp32_onnx, config, strategy=strategy, data=data, out_dir=out_dir, progress=progress)
