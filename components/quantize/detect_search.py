"""Accuracy-aware int8 for detectors: PTQ per calibrator, then sensitive head layers in float.

The classifier autotune (:mod:`.autotune`) judges trials by top-1; a detector
needs the detection gate (mAP *and* score calibration), and its sensitive spots
are the head outputs: a calibrator that clips the sigmoid class-score output
collapses every confidence (DESIGN.md). So the fallback here ranks *head
groups* (each graph output with the nodes that produce it, back to and
including its last Conv) by what quantizing only that group costs, and keeps
the worst ones in float, one more per trial.

Trials are judged on the validation split (choosing is part of training; the
pipeline's evaluate task then judges the winner on the held-out test split).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import GateRejected
from edgeslim.components.common.result import StageResult

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


def judge(onnx_path: str | Path, parent: dict[str, Any], data: Splits, task, split: str = "val"
          ) -> dict[str, Any]:
    """Detection metrics of ``onnx_path`` on ``split`` and the detection gate against ``parent``."""
    from edgeslim.components.tasks.detection import detection_metrics, gate_detection, onnx_detections

    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    dets, _, _ = onnx_detections(onnx_path, x, task)
    m = detection_metrics(dets, list(y), task.num_classes, task.score_threshold)
    verdict = gate_detection({"source": {"detection": parent}, "candidate": {"detection": m}}, task.gate)
    return {"map50": m["map50"], "map50_95": m["map50_95"], "mean_tp_score": m["mean_tp_score"],
            "recall": m["recall"], "passed": verdict["passed"], "gate": verdict["summary"]}


def _damage(row: dict[str, Any], parent: dict[str, Any]) -> float:
    # Points of mAP, plus the score drop on a 100-point scale, plus recall points.
    return ((parent["map50"] - row["map50"]) + 100.0 * (parent["mean_tp_score"] - row["mean_tp_score"])
            + (parent["recall"] - row["recall"]))


def quantize_detector_auto(fp32_onnx: str | Path, config, *, data: Splits, task, out_dir: str | Path,
                           model=None, export_config=None,
                           progress: Callable[[str], None] | None = None) -> StageResult:
    """The first int8 detector that passes the detection gate on the validation split.

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
    import dataclasses

    from edgeslim.components.tasks.detection import detection_metrics, onnx_detections
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Ranges depend on the graph and calibrator only, never on float_layers: calibrate each
    # calibrator once (the 2048-bin entropy search alone takes minutes on the reference detector).
    ranges: dict[str, dict[str, float]] = {}
    dets, _, _ = onnx_detections(fp32_onnx, data.x_val, task)
    parent = detection_metrics(dets, list(data.y_val), task.num_classes, task.score_threshold)
    trials: list[dict[str, Any]] = []
    results: dict[int, StageResult] = {}
    sens: list[dict[str, Any]] = []

    def record(kind: str, cal: str, float_layers: list[str], res: StageResult, seconds: float) -> dict[str, Any]:
        row = {"trial": len(trials) + 1, "kind": kind, "calibrator": cal, "float_layers": float_layers,
               "model": str(res.model), "size_bytes": Path(res.model).stat().st_size,
               "seconds": round(seconds, 2), **judge(res.model, parent, data, task)}
        trials.append(row)
        results[row["trial"]] = res
        if progress:
            progress(f"trial {row['trial']} {kind} {cal} float={len(float_layers)}: mAP@0.5 "
                     f"{row['map50']:.2f} (fp32 {parent['map50']:.2f}), TP score {row['mean_tp_score']:.3f} "
                     f"(fp32 {parent['mean_tp_score']:.3f}) -> {'pass' if row['passed'] else 'fail'}")
        return row

    def finish(row: dict[str, Any], reason: str) -> StageResult:
        final = out_dir / "model.int8.onnx"
        final.write_bytes(Path(row["model"]).read_bytes())
        win = results[row["trial"]]
        report = {"trials": trials, "winner": row["trial"], "reason": reason, "fp32_val": parent,
                  "head_sensitivity": sens}
        (out_dir / "autotune.json").write_text(json.dumps(report, indent=1, default=str))
        metrics = {"size_bytes": final.stat().st_size, "winner": row, "reason": reason, "trials": trials,
                   "head_sensitivity": sens, "calibrator": row["calibrator"],
                   "float_layers": win.metrics.get("float_layers", []),
                   # outputs left in float (head fallback or placement "weighted"): range unused
                   "float_outputs": win.metrics.get("float_outputs", []),
                   "ranges": win.metrics.get("ranges", {}),
                   **{k: win.metrics[k] for k in ("qdq_nodes", "per_channel_weights", "zero_points_all_zero")
                      if k in win.metrics}}
        lineage = {"stage": "quantize", "method": "auto", "task": "detection",
                   "config": config.to_json_dict(), "winning_trial": row["trial"],
                   "calibration_split": "train", "data_digest": data.digest()}
        return StageResult(final, metrics, lineage, time.perf_counter() - start)

    def key(r: dict[str, Any]) -> tuple:
        return (r["passed"], -_damage(r, parent))

    pinned: list[str] = []
    for cal in config.calibrators:
        t = time.perf_counter()
        ranges[cal] = calibrate_onnx(fp32_onnx, config.ptq(cal), data)
        res = quantize(fp32_onnx, config.ptq(cal), data=data, out_dir=out_dir / f"ptq-{cal}", ranges=ranges[cal])
        pinned = list(res.metrics["float_layers"])  # the recipe's patterns, resolved to nodes
        row = record("ptq", cal, pinned, res, time.perf_counter() - t)
        if row["passed"]:
            return finish(row, f"trial {row['trial']}: PTQ with the {cal} calibrator passed the detection "
                               f"gate ({row['gate']})")
    best = max(trials, key=key)
    cal = best["calibrator"]

    if config.max_float_layers > 0:
        # Sensitivity of each head group: only that group int8, everything else float.
        from edgeslim.components.quantize.sensitivity import preprocessed

        import onnx

        pre = preprocessed(fp32_onnx, out_dir / "pre.onnx")
        all_nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.name]
        for i, grp in enumerate(head_groups(pre)):
            others = [n for n in all_nodes if n not in grp["nodes"]]
            # The fp32 graph (not ``pre``): the graph ``ranges`` were calibrated on; node names are the same.
            res = quantize(fp32_onnx, dataclasses.replace(config.ptq(cal), float_layers=others), data=data,
                           out_dir=out_dir / "heads" / f"group{i}", ranges=ranges[cal])
            r = judge(res.model, parent, data, task)
            sens.append({**grp, **{k: r[k] for k in ("map50", "mean_tp_score", "recall")},
                         "damage": round(_damage(r, parent), 4)})
        sens.sort(key=lambda r: -r["damage"])
        ranked = [r for r in sens if r["damage"] > 0.0] or sens
        for k in range(1, min(config.max_float_layers, len(ranked)) + 1):
            keep = pinned + [n for r in ranked[:k] for n in r["nodes"]]
            t = time.perf_counter()
            res = quantize(fp32_onnx, config.ptq(cal, keep), data=data, out_dir=out_dir / f"fallback-{k}",
                           ranges=ranges[cal])
            row = record("fallback", cal, keep, res, time.perf_counter() - t)
            if row["passed"]:
                outs = [r["output"] for r in ranked[:k]]
                return finish(row, f"trial {row['trial']}: PTQ ({cal}) failed the detection gate; keeping the "
                                   f"{k} most sensitive head(s) (producing {outs}) in float passed ({row['gate']})")
        best = max(trials, key=key)

    if config.qat and model is not None:
        from edgeslim.components.quantize.detect_qat import qat_detector

        keep = list(best["float_layers"])
        t = time.perf_counter()
        res = qat_detector(model, config, data=data, out_dir=out_dir / "qat", calibrator=cal, float_layers=keep,
                           export_config=export_config)
        row = record("qat", cal, keep, res, time.perf_counter() - t)
        row["output_error_val"] = res.metrics["output_error_val"]
        if row["passed"]:
            return finish(row, f"trial {row['trial']}: PTQ ({cal}) and float fallback failed the detection gate; "
                               f"QAT ({config.qat_epochs} epochs, weighted placement, matching the fp32 outputs) "
                               f"passed ({row['gate']})")
        best = max(trials, key=key)

    (out_dir / "autotune.json").write_text(json.dumps(
        {"trials": trials, "winner": None, "fp32_val": parent, "head_sensitivity": sens}, indent=1, default=str))
    fix = ("raise quantize.max_float_layers" if config.max_float_layers < len(sens) or not sens
           else "loosen task.gate") + ", or try another calibrator"
    if not config.qat:
        fix += ", or set quantize.qat: true"
    elif model is None:
        fix += " (QAT was not tried: no torch model was given)"
    else:
        fix += ", or raise quantize.qat_epochs"
    raise GateRejected(
        f"quantize(auto): no detector candidate passed the detection gate after {len(trials)} trial(s); best "
        f"was trial {best['trial']} ({best['kind']}, {best['calibrator']}: mAP@0.5 {best['map50']:.2f} vs "
        f"{parent['map50']:.2f}, mean TP score {best['mean_tp_score']:.3f} vs {parent['mean_tp_score']:.3f}); {fix}")
