"""Accuracy-aware int8 for detectors: the detection strategy of the one search (:mod:`edgeslim.components.quantize.search`).

The classifier strategy judges trials by top-1; a detector needs the detection
gate (mAP *and* score calibration), and its sensitive spots are the head outputs:
a calibrator that clips the sigmoid class-score output collapses every confidence
(docs/design.md). So the fallback here ranks *output tails*
(:func:`~edgeslim.components.quantize.sensitivity.output_tails`: each graph output with
the nodes that produce it -- decode, DFL, concat, sigmoid -- back to and including its
last weighted layers, found from the graph, whatever the model) by what quantizing only
that group costs (a single tail is not measured: it ranks first whatever it costs), and keeps
the worst ones in float, one more per trial. When there are fewer tails than
``max_float_layers`` (one decoded output), the other conv/linear layers are ranked after them
by a one-pass proxy (:func:`~edgeslim.components.quantize.sensitivity.layer_noise_proxy`: the
SQNR of each layer's own int8 rounding, every layer's input captured in one ONNX Runtime pass
over a few val images), not by a quantized model and an inference per layer: the search's cost
does not grow with the number of layers. The fp32 outputs the trials' SQNR is measured against
are computed once per search.

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
from edgeslim.components.quantize.tail_ranking import rank_output_tails

# A judged row's figures in the fallback's ranking table: mAP@0.5, score calibration, recall, output SQNR vs fp32.
_RANKED = ("map50", "mean_tp_score", "recall", "sqnr_db")
# Val images a trial is screened on, at least (a quarter of val; no screen when val has fewer than twice
# as many). Fewer is noise: on a trained YOLOv8n, 32 images moved mAP@0.5 by more than a 0.3 pt gate's
# doubled allowance, and the screen rejected candidates within the target on test (docs/benchmarks.md, "Trained YOLOv8n").
_SCREEN_MIN = 128
# fp32 raw val outputs kept for the trials' SQNR: the first images, at most this many and this many bytes (a
# count, so that what the search holds stops growing with val at a few hundred images)
_REFERENCE_IMAGES = 256
_REFERENCE_BYTES = 512 << 20


def head_groups(onnx_path: str | Path) -> list[dict[str, Any]]:
    """Per graph output, the node names from the output back to its last weighted layers
    (:func:`~edgeslim.components.quantize.sensitivity.output_tails`).

    Returns:
        ``[{"output": name, "nodes": [...], "conv": name, "layers": [...]}]`` in output order.
    """
    from edgeslim.components.quantize.sensitivity import output_tails

    return [{**t, "conv": t["layers"][0]} for t in output_tails(onnx_path)]


def _records(onnx_path: str | Path, x, y, task, *, on_batch=None):
    """A detector's records on ``x`` against labels ``y``, each batch matched as it is decoded."""
    from edgeslim.components.tasks.detection.evaluate import detect_batches
    from edgeslim.components.tasks.detection.records import DetectionRecorder

    rec = DetectionRecorder(task.num_classes, task.score_threshold)
    detect_batches([onnx_path], x, task, on_batch=on_batch,
                   on_detections=lambda start, dets: rec.add(dets[0], list(y[start:start + len(dets[0])])))
    return rec.records()


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
    qat_settings = {"batch_size": 32}  # detectors' training batches are large (a 640 px YOLO: ~0.1 GB an image)

    def __init__(self, fp32_onnx: str | Path, task, *, model=None, export_config=None):
        self.fp32_onnx, self.task_config, self.model, self.export_config = fp32_onnx, task, model, export_config
        self.table: list[dict[str, Any]] = []
        self._val_outputs: list[Any] = []  # fp32 raw outputs of the first val images (_REFERENCE_IMAGES)
        self._screen_parent: dict[str, Any] | None = None  # fp32 metrics on the screening subsample
        self._val_records: Any = None  # fp32's per-image matches on val, for the drops' intervals
        self._screen_records: Any = None  # and on the screening subsample

    def reference(self, data: Splits) -> dict[str, Any]:
        import numpy as np

        from edgeslim.components.tasks.detection.records import record_metrics

        kept, room, images = [], [_REFERENCE_BYTES], [_REFERENCE_IMAGES]

        def keep(raw):  # the first images' raw outputs, as many as fit (at least one)
            outs, _ = raw[0]
            per = max(sum(o.nbytes for o in outs) // max(len(outs[0]), 1), 1)
            k = min(len(outs[0]), images[0], max(room[0] // per, 0 if kept else 1))
            if k:
                kept.append([o[:k].copy() for o in outs])
                room[0] -= k * per
                images[0] -= k

        self._val_records = _records(self.fp32_onnx, data.x_val, data.y_val, self.task_config, on_batch=keep)
        self._val_outputs = [np.concatenate(p) for p in zip(*kept)]
        self._screen_parent, self._screen_records = None, None
        self.parent = record_metrics(self._val_records)
        return {"fp32_val": self.parent, "sqnr_val_images": len(self._val_outputs[0]) if kept else 0}

    def judge(self, candidate: str | Path, data: Splits) -> dict[str, Any]:
        return self._judge(candidate, data.x_val, data.y_val, self.parent, self.task_config.gate, self._val_records)

    def screen(self, candidate: str | Path, data: Splits) -> dict[str, Any] | None:
        """The candidate on the first ``n // 4`` val images (at least ``_SCREEN_MIN``): a trial refused there
        is not judged on the whole split. With ``task.gate.confidence`` it is refused only when a drop's
        interval on those images is above its allowance (worse beyond the noise); without, when it fails the
        gate with every allowed drop doubled. None where val is too small to screen."""
        k = max(_SCREEN_MIN, len(data.x_val) // 4)
        if 2 * k > len(data.x_val):
            return None
        from edgeslim.components.tasks.detection.records import record_metrics

        g = self.task_config.gate
        if self._screen_parent is None:
            self._screen_records = self._val_records.head(k)
            self._screen_parent = record_metrics(self._screen_records)
        if g.confidence is not None:
            return {**self._judge(candidate, data.x_val[:k], data.y_val[:k], self._screen_parent, g,
                                  self._screen_records), "screened_on": k}
        loose = dataclasses.replace(g, max_map_drop=2 * g.max_map_drop, max_map50_95_drop=2 * g.max_map50_95_drop,
                                    max_tp_score_drop=2 * g.max_tp_score_drop, max_recall_drop=2 * g.max_recall_drop)
        return {**self._judge(candidate, data.x_val[:k], data.y_val[:k], self._screen_parent, loose, None),
                "screened_on": k}

    def _judge(self, candidate, x, y, parent: dict[str, Any], gate, parent_records) -> dict[str, Any]:
        """The candidate on ``x`` against fp32's figures on it (``parent``); with fp32's per-image records on it,
        each drop's interval too (the gate then judges by them where it sets a confidence)."""
        from edgeslim.components.common.confidence import detection_drops, drop_intervals
        from edgeslim.components.common.onnx_runtime import SqnrAccumulator
        from edgeslim.components.tasks.detection.evaluate import gate_detection
        from edgeslim.components.tasks.detection.records import record_metrics

        task = self.task_config
        sqnr, done = SqnrAccumulator(), [0]

        def compare(raw):  # SQNR of the raw outputs (not decoded) against fp32's, on the images kept
            outs, _ = raw[0]
            start, n = done[0], len(outs[0])
            done[0] += n
            for r, c in zip(self._val_outputs, outs):
                m = max(0, min(n, len(r) - start))
                sqnr.add(r[start:start + m], c[:m])

        records = _records(candidate, x, y, task, on_batch=compare)
        m = record_metrics(records)
        stats = {} if parent_records is None else detection_drops(parent_records, records)
        verdict = gate_detection({"source": {"detection": parent}, "candidate": {"detection": m},
                                  "confidence": stats}, gate)
        allowed = {"map50_drop": gate.max_map_drop, "map50_95_drop": gate.max_map50_95_drop,
                   "mean_tp_score_drop": gate.max_tp_score_drop, "recall_drop": gate.max_recall_drop}
        return {"map50": m["map50"], "map50_95": m["map50_95"], "mean_tp_score": m["mean_tp_score"],
                "recall": m["recall"], "sqnr_db": round(sqnr.db(), 3), "passed": verdict["passed"],
                "outcome": verdict["outcome"], "gate": verdict["summary"],
                "intervals": drop_intervals(stats, allowed, gate.confidence)}

    def _fp32_for(self, row: dict[str, Any]) -> dict[str, Any]:
        """fp32's figures on the images ``row`` was judged on: a screened-out row's are the screen's."""
        return self._screen_parent if row.get("screened_on") and self._screen_parent is not None else self.parent

    def damage(self, row: dict[str, Any]) -> float:
        # Points of mAP, plus the score drop on a 100-point scale, plus recall points, against fp32 on the same images.
        p = self._fp32_for(row)
        return ((p["map50"] - row["map50"]) + 100.0 * (p["mean_tp_score"] - row["mean_tp_score"])
                + (p["recall"] - row["recall"]))

    def key(self, row: dict[str, Any]) -> tuple:
        # a trial the gate could not decide ranks above one it refused beyond the noise
        return row["passed"], row.get("outcome") != "refused", -self.damage(row)

    def choice_key(self, row: dict[str, Any]) -> tuple:
        # Among passing trials (select: best): the most mAP@0.5:0.95 kept (box precision, which a calibrator
        # that clips the box regression loses while mAP@0.5 holds), then mAP@0.5, then the output SQNR.
        return row["map50_95"], row["map50"], row["sqnr_db"]

    def float_from_start(self, fp32_onnx):
        """Every output's tail (:func:`~edgeslim.components.quantize.sensitivity.output_tails`: the head's last
        weighted layers and what follows them -- a DFL, the decode, the sigmoid) and every input's first
        weighted layers (:func:`~edgeslim.components.quantize.sensitivity.input_layers`), found from the graph.
        The int8 rounding of the output convs moves every box and score, and their weights are a few percent
        of the model's bytes; Ultralytics' int8 exports keep the same layers out of int8, by name. The first
        layers read the image itself, whose 256 levels on 0..1 a symmetric int8 scale cuts to 128, and their
        weights are a few hundred parameters."""
        import tempfile

        from edgeslim.components.quantize.sensitivity import input_layers, output_tails, preprocessed

        with tempfile.TemporaryDirectory(prefix="edgeslim-tails-") as tmp:
            pre = preprocessed(fp32_onnx, Path(tmp) / "pre.onnx")
            tails, heads = output_tails(pre), input_layers(pre)
        return ([{"label": t["output"], "nodes": t["nodes"]} for t in tails]
                + [{"label": h["input"], "nodes": h["nodes"]} for h in heads])

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned):
        # Each output tail not already float, measured alone in int8; then the other layers by the one-pass proxy.
        return rank_output_tails(self, _RANKED, fp32_onnx, config, calibrator=calibrator, ranges=ranges, data=data,
                                 out_dir=out_dir, pinned=pinned, skip_pinned_tails=True)

    def train_qat(self, fp32_onnx, config, *, data, out_dir, progress=None):
        from edgeslim.components.tasks.detection.qat import qat_detector

        return qat_detector(self.model, config, data=data, out_dir=out_dir, fp32_onnx=fp32_onnx,
                            export_config=self.export_config, progress=progress)

    def qat_row(self, res):
        return {"output_error_val": res.metrics["output_error_val"]}

    def figures(self, row):
        screened, p = row.get("screened_on"), self._fp32_for(row)
        where = f" (first {screened} val images)" if screened else ""
        return (f"mAP@0.5 {row['map50']:.2f} vs fp32 {p['map50']:.2f}, mean TP score {row['mean_tp_score']:.3f} "
                f"vs {p['mean_tp_score']:.3f}{where}")

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
    """The first int8 detector that passes the detection gate on the validation split (:func:`edgeslim.components.quantize.search.search`).

    Args:
        fp32_onnx: the fp32 detector to quantize (the gate compares against it).
        config: an ``AccuracyAwareQuantizeConfig`` (calibrators, samples, ``max_float_layers``,
            ``float_layers`` pinned to float in every trial).
        data: calibration from train, trials judged on val.
        task: the recipe's ``DetectionTaskConfig`` (decoder and gate).
        out_dir: one folder per trial, ``autotune.json``.
        model: the torch detector ``fp32_onnx`` was exported from; with ``config.qat`` and
            no passing PTQ/fallback trial, QAT (:mod:`.qat`) is the last trial.
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
