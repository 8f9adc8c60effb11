"""Accuracy-aware int8 for detectors: the detection strategy of the one search (:mod:`.search`).

The classifier strategy judges trials by top-1; a detector needs the detection
gate (mAP *and* score calibration), and its sensitive spots are the head outputs:
a calibrator that clips the sigmoid class-score output collapses every confidence
(DESIGN.md). So the fallback here ranks *output tails*
(:func:`~edgeslim.components.quantize.sensitivity.output_tails`: each graph output with
the nodes that produce it -- decode, DFL, concat, sigmoid -- back to and including its
last weighted layers, found from the graph, whatever the model) by what quantizing only
that group costs, and keeps the worst ones in float, one more per trial. When there are
fewer tails than ``max_float_layers`` (one decoded output), every other conv/linear
layer is measured alone too, by its output SQNR on a few val images, and ranked after them.

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

# A judged row's figures in the fallback's ranking table: mAP@0.5, score calibration, recall, output SQNR vs fp32.
_RANKED = ("map50", "mean_tp_score", "recall", "sqnr_db")
_LAYER_SAMPLES = 64  # val images a single layer's output SQNR is measured on


def head_groups(onnx_path: str | Path) -> list[dict[str, Any]]:
    """Per graph output, the node names from the output back to its last weighted layers
    (:func:`~edgeslim.components.quantize.sensitivity.output_tails`).

    Returns:
        ``[{"output": name, "nodes": [...], "conv": name, "layers": [...]}]`` in output order.
    """
    from edgeslim.components.quantize.sensitivity import output_tails

    return [{**t, "conv": t["layers"][0]} for t in output_tails(onnx_path)]


class DetectorStrategy(Strategy):
    """The detection gate (mAP *and* score calibration) against the fp32 detector on val; the
    fallback keeps whole output tails (and, past them, single layers) in float, the most damaging
    first (ties: the lower output SQNR)."""

    task = "detection"
    candidate = "detector candidate"
    gate_name = "detection gate"
    group_noun = "head(s) producing"
    qat_note = " (weighted placement, matching the fp32 outputs)"
    fields = ("map50_95", *_RANKED)
    table_key = "head_sensitivity"

    def __init__(self, fp32_onnx: str | Path, task, *, model=None, export_config=None):
        self.fp32_onnx, self.task_config, self.model, self.export_config = fp32_onnx, task, model, export_config
        self.table: list[dict[str, Any]] = []
        self._fp32_session = None
        self._layer_reference: tuple[Any, list] | None = None  # (inputs, fp32 raw outputs) single layers compare to

    def fp32_session(self):
        """The fp32 detector's ONNX Runtime session, made once for every trial and layer judged."""
        if self._fp32_session is None:
            from edgeslim.components.common.onnx_runtime import make_session

            self._fp32_session = make_session(self.fp32_onnx)
        return self._fp32_session

    def reference(self, data: Splits) -> dict[str, Any]:
        from edgeslim.components.tasks.detection import detection_metrics, onnx_detections

        dets, _, _ = onnx_detections(self.fp32_onnx, data.x_val, self.task_config, keep_outputs=False)
        self.parent = detection_metrics(dets, list(data.y_val), self.task_config.num_classes,
                                        self.task_config.score_threshold)
        return {"fp32_val": self.parent}

    def judge(self, candidate: str | Path, data: Splits) -> dict[str, Any]:
        import numpy as np

        from edgeslim.components.common.onnx_runtime import SqnrAccumulator, run_outputs
        from edgeslim.components.tasks.detection import detect_batches, detection_metrics, gate_detection

        task = self.task_config
        fp32, sqnr, done = self.fp32_session(), SqnrAccumulator(), [0]

        def compare(raw):  # the fp32 outputs of the same batch (not decoded): SQNR of the raw outputs
            outs, _ = raw[0]
            n = len(outs[0])
            _, ref = run_outputs(fp32, np.ascontiguousarray(data.x_val[done[0]:done[0] + n]), batch=n)
            done[0] += n
            for r, c in zip(ref, outs):
                sqnr.add(r, c)

        (dets,) = detect_batches([candidate], data.x_val, task, on_batch=compare)
        m = detection_metrics(dets, list(data.y_val), task.num_classes, task.score_threshold)
        verdict = gate_detection({"source": {"detection": self.parent}, "candidate": {"detection": m}}, task.gate)
        return {"map50": m["map50"], "map50_95": m["map50_95"], "mean_tp_score": m["mean_tp_score"],
                "recall": m["recall"], "sqnr_db": round(sqnr.db(), 3), "passed": verdict["passed"],
                "gate": verdict["summary"]}

    def damage(self, row: dict[str, Any]) -> float:
        # Points of mAP, plus the score drop on a 100-point scale, plus recall points.
        p = self.parent
        return ((p["map50"] - row["map50"]) + 100.0 * (p["mean_tp_score"] - row["mean_tp_score"])
                + (p["recall"] - row["recall"]))

    def key(self, row: dict[str, Any]) -> tuple:
        return row["passed"], -self.damage(row)

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned):
        # Damage of each output tail (then of each other layer): only that group int8, everything else float.
        import onnx

        from edgeslim.components.quantize.ptq import quantize
        from edgeslim.components.quantize.sensitivity import output_tails, preprocessed, quantizable_layers

        pre = preprocessed(fp32_onnx, out_dir / "pre.onnx")
        all_nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.name]
        tails, layers = output_tails(pre), []
        if config.max_float_layers > len(tails):  # too few tails to fill the fallback: single layers too
            in_tails = {n for g in tails for n in g["nodes"]} | set(pinned)
            layers = [{"output": lay["layer"], "nodes": [lay["node"]], "layers": [lay["node"]]}
                      for lay in quantizable_layers(pre) if lay["node"] not in in_tails]
        rows: list[dict[str, Any]] = []
        for i, grp in enumerate(tails + layers):
            others = [n for n in all_nodes if n not in grp["nodes"]]
            # The fp32 graph (not ``pre``): the graph ``ranges`` were calibrated on; node names are the same.
            res = quantize(fp32_onnx, dataclasses.replace(config.ptq(calibrator), float_layers=others), data=data,
                           out_dir=out_dir / "heads" / f"group{i}", ranges=ranges)
            if i < len(tails):
                r = self.judge(res.model, data)
                rows.append({**grp, **{k: r[k] for k in _RANKED}, "damage": round(self.damage(r), 4)})
            else:  # a single layer: output SQNR on a few val images (one PTQ + judging per layer would cost minutes)
                rows.append({**grp, "sqnr_db": self.output_sqnr(res.model, data.x_val[:_LAYER_SAMPLES]),
                             "damage": None})
        heads = sorted(rows[:len(tails)], key=lambda r: (-r["damage"], r["sqnr_db"]))
        ranked = [r for r in heads if r["damage"] > 0.0] or heads
        self.table = heads + sorted(rows[len(tails):], key=lambda r: r["sqnr_db"])
        return [{"label": r["output"], "nodes": r["nodes"]} for r in ranked + self.table[len(heads):]]

    def output_sqnr(self, candidate: str | Path, x) -> float:
        """SQNR (dB) of ``candidate``'s raw outputs against the fp32 detector's on ``x`` (the fp32 outputs
        are computed once for the ``x`` every single layer is measured on)."""
        import numpy as np

        from edgeslim.components.common.onnx_runtime import SqnrAccumulator, make_session, run_outputs

        x = np.ascontiguousarray(x)
        if self._layer_reference is None or not np.array_equal(self._layer_reference[0], x):
            self._layer_reference = (x, run_outputs(self.fp32_session(), x)[1])
        acc = SqnrAccumulator()
        for ref, got in zip(self._layer_reference[1], run_outputs(make_session(candidate), x)[1]):
            acc.add(ref, got)
        return round(acc.db(), 3)

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
