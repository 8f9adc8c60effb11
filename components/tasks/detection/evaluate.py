"""Detection evaluation and the detection gate.

The evaluator decodes a model's raw outputs (:mod:`edgeslim.components.tasks.detection.runtime`) and reports
mAP@0.5, mAP@0.5:0.95 (COCO-style: greedy matching by score, 101-point
interpolated precision, classes without ground truth left out), per-class AP,
precision and recall at the deployment score threshold, and the mean score of
true positives.

The gate looks at score calibration as well as mAP: a calibrator that clips the
sigmoid class-score output (docs/design.md) leaves the ranking, and so mAP,
almost intact while every score falls under the deployment threshold. The
mean true-positive score and the recall at the threshold catch that, and the
gate says so in words.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.confidence import detection_drops, drop_check
from edgeslim.components.common.onnx_runtime import (STREAM_BATCH, BatchTimer, SqnrAccumulator, evaluation_batch,
                                                     input_rejected, make_session, run_side_by_side, sample_rows)
from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError
from edgeslim.components.common.result import GateCheck, StageResult, verdict
from edgeslim.components.tasks.detection.records import (AgreementCounter, DetectionRecorder, detection_records,
                                                         record_metrics, record_pr_curve)
from edgeslim.components.tasks.detection.runtime import decode_outputs
from edgeslim.components.common.model_outputs import forward_tensors, output_names

def detection_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int,
                      score_threshold: float) -> dict[str, Any]:
    """mAP@0.5, mAP@0.5:0.95, per-class AP@0.5, precision/recall at the threshold, mean TP score
    (:func:`~edgeslim.components.tasks.detection.records.record_metrics` of the images' records).

    Args:
        preds: per image (M, 6) ``[x1, y1, x2, y2, score, class]``.
        gts: per image (K, 5) ``[x1, y1, x2, y2, class]``.
        num_classes: classes 0..num_classes-1 are scored.
        score_threshold: the deployment threshold.

    Returns:
        Percentages for mAP, precision and recall (points); scores in [0, 1].
    """
    return record_metrics(detection_records(preds, gts, num_classes, score_threshold))


def pr_curve(preds, gts, num_classes: int, score_threshold: float, *, points: int = 200) -> dict[str, Any]:
    """Precision against recall at IoU 0.5, all classes pooled, at most ``points`` points, and the operating
    point at ``score_threshold`` (:func:`~edgeslim.components.tasks.detection.records.record_pr_curve`)."""
    return record_pr_curve(detection_records(preds, gts, num_classes, score_threshold), points=points)


def detect_batches(onnx_paths: Sequence[str | Path], x, task, *, basic: Sequence[bool | None] | bool | None = None,
                   batch: int = STREAM_BATCH, on_batch=None, decode: Sequence[bool] | None = None,
                   threads: int = 0, timer=None, only: dict[int, np.ndarray] | None = None,
                   sessions: Sequence | None = None, on_detections=None) -> list[list[np.ndarray]]:
    """Decoded detections of one or more ONNX detectors on ``x``, run side by side a batch at a time.

    Each batch of ``x`` is read once (``x`` may be a lazy split: one decode per image, whatever the number
    of models) and every model runs on it; outputs are decoded per batch, so neither the inputs nor the
    raw outputs of the whole split are held.

    Args:
        onnx_paths: the models.
        x: the inputs.
        task: the recipe's ``DetectionTaskConfig``.
        basic: per model (or for all), Q/DQ semantics (see :func:`make_session`; None: where the graph has Q/DQ).
        batch: images per run.
        on_batch: called with each batch's raw outputs, per model ``(outputs, names)``.
        decode: per model, whether its outputs are decoded to boxes (default: every model's); a model
            run only for ``on_batch`` gets an empty list.
        threads: ONNX Runtime intra-op threads (0: its default; see :func:`make_session`).
        timer: a :class:`~edgeslim.components.common.onnx_runtime.BatchTimer` that times its models on
            these runs.
        only: ``{model: sorted row indices}``, a model run on those images alone (its list holds theirs,
            in order; ``on_batch`` gets ``None`` for it on a batch with none of them).
        sessions: the models' sessions, when the caller made them (``basic`` and ``threads`` then unused).
        on_detections: called with each batch's first row and, per model, its decoded detections on the
            batch (as the returned lists hold them); with it, nothing is kept and the lists come back empty,
            so the caller holds only what it makes of them.

    Returns:
        Per model, per image an (M, 6) ``[x1, y1, x2, y2, score, class]`` array.
    """
    basics = [basic] * len(onnx_paths) if basic is None or isinstance(basic, bool) else list(basic)
    decodes = [True] * len(onnx_paths) if decode is None else list(decode)
    if sessions is None:
        sessions = [make_session(p, basic=b, threads=threads, side_by_side=True)
                    for p, b in zip(onnx_paths, basics)]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    dets: list[list[np.ndarray]] = [[] for _ in sessions]

    def rejects(k: int, rows, exc: Exception) -> DataError:  # ORT raises its own types for shape mismatches
        return input_rejected(onnx_paths[k], x, exc)

    for start, _, outs in run_side_by_side(sessions, x, batch, on_error=rejects, timer=timer, only=only):
        got = [decode_outputs(o, task, n) if keep and o is not None else [] for n, o, keep in zip(names, outs, decodes)]
        if on_detections is not None:
            on_detections(start, got)
        else:
            for out, d in zip(dets, got):
                out.extend(d)
        if on_batch is not None:
            on_batch([(o, n) if o is not None else None for o, n in zip(outs, names)])
    return dets


def onnx_detections(onnx_path: str | Path, x: np.ndarray, task, *, basic: bool = True, keep_outputs: bool = True
                    ) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[str]]:
    """Decoded detections of an ONNX model on ``x`` (decoded a batch at a time); also its raw outputs
    over all of ``x`` (``None`` with ``keep_outputs=False``: what scales with the split) and their names."""
    kept: list[list[np.ndarray]] = []
    names: list[str] = []

    def keep(raw):
        outs, n = raw[0]
        names[:] = n
        if keep_outputs:
            kept.append(outs)

    (dets,) = detect_batches([onnx_path], x, task, basic=basic, on_batch=keep)
    outs = [np.concatenate(p) for p in zip(*kept)] if keep_outputs and kept else (None if not keep_outputs else [])
    return dets, outs, names


def torch_detections(model, x: np.ndarray, task, batch: int = 128) -> list[np.ndarray]:
    """Decoded detections of a torch detector (outputs named ``output_0..`` as exported), decoded a batch
    at a time."""
    import torch

    model.eval()
    dets: list[np.ndarray] = []
    for i in range(0, len(x), batch):
        outs = [o.numpy() for o in forward_tensors(model, torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))]
        dets.extend(decode_outputs(outs, task, output_names(len(outs))))
    return dets


def detection_agreement(reference: list[np.ndarray], candidate: list[np.ndarray], threshold: float,
                        iou: float = 0.5) -> float:
    """Share of the parent's detections above ``threshold`` that the candidate also makes."""
    counter = AgreementCounter(threshold, iou)
    counter.add(reference, candidate)
    return counter.share()


def evaluate_detection(candidate_onnx: str | Path, config, *, parent_onnx: str | Path, data: Splits,
                       task, student_onnx: str | Path | None = None) -> StageResult:
    """Evaluate a detector candidate and its parent side by side on the test split.

    One pass over the split: each batch, as it is read (decoded, for an image split), runs through the
    parent, the candidate (Q/DQ semantics) and the student where there is one, and, on
    ``config.cpu_int8_kernel_samples`` images spread over the split, the candidate on ORT's fused int8 CPU
    kernels. The outputs' SQNR and the output error are summed over batches rather than computed over held
    outputs; the report's figures (output error, precision-recall curves) come from the same pass, and
    the parent's and the candidate's latency is timed on its runs
    (:class:`~edgeslim.components.common.onnx_runtime.BatchTimer`).

    Args:
        candidate_onnx: the int8 Q/DQ ONNX (judged in Q/DQ semantics).
        config: the recipe's ``EvaluateConfig`` (latency settings, the images of the fused-kernel figure).
        parent_onnx: the parent's fp32 ONNX.
        data: detection splits (``y_*`` hold (k, 5) boxes per image).
        task: the recipe's ``DetectionTaskConfig``.
        student_onnx: the fp32 ONNX the candidate was quantized from, when distill or prune made one:
            the output error is measured against it.

    Returns:
        ``StageResult`` whose metrics have the spine's shape (``metric`` = mAP@0.5 in points,
        ``fidelity``, size, latency) plus a ``detection`` section per model, ``figures`` and ``confidence``: the
        statistic of each drop the gate checks, a paired bootstrap over the test images
        (:func:`~edgeslim.components.common.confidence.detection_drops`). Each batch's
        detections are matched to its labels as it is decoded and kept only as compact records
        (:class:`~edgeslim.components.tasks.detection.records.DetectionRecorder`).
    """
    from edgeslim.components.common.output_error import OutputError, reference_onnx

    t0 = time.perf_counter()
    sqnr, err = SqnrAccumulator(), OutputError()
    ref_path, reference = reference_onnx(parent_onnx=parent_onnx, student_onnx=student_onnx)
    own = ref_path != Path(parent_onnx)
    ref = 3 if own else 0
    chart_error: list[str] = []

    def flat(outs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([o.reshape(len(o), -1) for o in outs], 1)

    def on_batch(raw) -> None:
        sqnr.add(flat(raw[0][0]), flat(raw[1][0]))
        if not chart_error:
            try:  # a chart must not cost the evaluation: the report says what went wrong
                err.add(raw[ref], raw[1])
            except Exception as exc:
                chart_error.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    fused_rows = sample_rows(len(data.x_test), config.cpu_int8_kernel_samples)
    paths = [parent_onnx, candidate_onnx, candidate_onnx, *([ref_path] if own else [])]
    sessions = [make_session(p, basic=b, threads=config.threads, side_by_side=True)
                for p, b in zip(paths, [None, None, False, None])]
    timer = BatchTimer([0, 1], config.latency_batches, config.latency_warmup, config.latency_repeats)
    # parent, candidate; the fused kernels and the candidate's Q/DQ on the fused-kernel images
    recorders = [DetectionRecorder(task.num_classes, task.score_threshold) for _ in range(4)]
    agreement = AgreementCounter(task.score_threshold)

    def on_detections(start: int, dets: list[list[np.ndarray]]) -> None:  # each batch matched, then dropped
        gts = list(data.y_test[start:start + len(dets[0])])
        recorders[0].add(dets[0], gts)
        recorders[1].add(dets[1], gts)
        agreement.add(dets[0], dets[1])
        local = fused_rows[(fused_rows >= start) & (fused_rows < start + len(gts))] - start
        if len(local):
            recorders[2].add(dets[2], [gts[i] for i in local])
            recorders[3].add([dets[1][i] for i in local], [gts[i] for i in local])

    detect_batches(paths, data.x_test, task, on_batch=on_batch, decode=[True, True, True, False][:len(paths)],
                   batch=evaluation_batch(config.latency_batches), timer=timer, only={2: fused_rows},
                   sessions=sessions, on_detections=on_detections)
    parent_records, cand_records = recorders[0].records(), recorders[1].records()
    keep = ("metric", "size_bytes", "latency_ms", "detection")

    def measured(k: int, onnx_path, records) -> dict[str, Any]:
        m = record_metrics(records)
        return {"metric": m["map50"], "detection": m, "size_bytes": Path(onnx_path).stat().st_size,
                "latency_ms": timer.result(k, sessions[k])}

    parent, cand = measured(0, parent_onnx, parent_records), measured(1, candidate_onnx, cand_records)
    agree = agreement.share()
    metrics = {
        "metric_name": "map50",
        "task": "detection",
        "test_samples": int(len(data.x_test)),
        "source": {k: parent[k] for k in keep},
        "candidate": {
            **{k: cand[k] for k in keep},
            # top1_agreement mirrors the detection agreement so the spine's registry metrics work.
            "fidelity": {"detection_agreement": agree, "top1_agreement": agree,
                         "sqnr_db": round(sqnr.db(), 3)},
        },
    }
    if len(fused_rows):  # the fused kernels' mAP@0.5 beside the candidate's Q/DQ one, on the same images
        metrics["candidate"].update(
            cpu_int8_kernel_metric=record_metrics(recorders[2].records())["map50"],
            cpu_int8_kernel_samples=int(len(fused_rows)),
            cpu_int8_kernel_qdq_metric=record_metrics(recorders[3].records())["map50"])
    metrics["candidate"]["size_ratio"] = round(parent["size_bytes"] / cand["size_bytes"], 3)
    metrics["confidence"] = detection_drops(parent_records, cand_records)
    if chart_error:
        metrics["figures"] = {"error": chart_error[0]}
    else:
        metrics["figures"] = {"output_error": err.result(reference), "pr": {
            "fp32": record_pr_curve(parent_records), "int8": record_pr_curve(cand_records)}}
    return StageResult(model=Path(candidate_onnx), metrics=metrics, seconds=time.perf_counter() - t0)


def gate_detection(metrics: dict[str, Any], config) -> dict[str, Any]:
    """Judge a detector: mAP@0.5 drop, mAP@0.5:0.95 drop (box precision), mean true-positive score drop,
    recall at the threshold.

    Args:
        metrics: :func:`evaluate_detection`'s metrics (``source``/``candidate`` with ``detection``).
        config: a ``DetectionGateConfig``.

    Returns:
        ``{passed, outcome, checks, summary}``; when mAP@0.5 held but scores or box precision collapsed the
        summary says so. With ``config.confidence`` each drop is judged by its interval (``metrics["confidence"]``),
        and a drop whose interval holds its allowance is "not distinguishable from noise".
    """
    s, c = metrics["source"]["detection"], metrics["candidate"]["detection"]
    thr = c.get("score_threshold", 0.25)
    map_drop = round(s["map50"] - c["map50"], 4)
    loc_drop = round(s["map50_95"] - c["map50_95"], 4)
    score_drop = round(s["mean_tp_score"] - c["mean_tp_score"], 4)
    recall_drop = round(s["recall"] - c["recall"], 4)
    stats, level = metrics.get("confidence") or {}, config.confidence
    checks = [
        drop_check("map50_drop", map_drop, config.max_map_drop,
                   f"mAP@0.5 fell {map_drop:.2f} pt ({s['map50']:.2f} -> {c['map50']:.2f}); "
                   f"allowed {config.max_map_drop:.2f}", stat=stats.get("map50_drop"), level=level),
        drop_check("map50_95_drop", loc_drop, config.max_map50_95_drop,
                   f"mAP@0.5:0.95 fell {loc_drop:.2f} pt ({s['map50_95']:.2f} -> {c['map50_95']:.2f}); "
                   f"allowed {config.max_map50_95_drop:.2f}", stat=stats.get("map50_95_drop"), level=level),
        drop_check("mean_tp_score_drop", score_drop, config.max_tp_score_drop,
                   f"mean true-positive score {s['mean_tp_score']:.3f} -> {c['mean_tp_score']:.3f}; "
                   f"allowed drop {config.max_tp_score_drop:.3f}", stat=stats.get("mean_tp_score_drop"),
                   level=level, unit=""),
        drop_check("recall_drop", recall_drop, config.max_recall_drop,
                   f"recall at score >= {thr:g} {s['recall']:.2f}% -> {c['recall']:.2f}%; "
                   f"allowed drop {config.max_recall_drop:.2f} pt", stat=stats.get("recall_drop"), level=level),
        GateCheck("min_recall", c["recall"], config.min_recall, c["recall"] >= config.min_recall,
               f"recall at score >= {thr:g} {c['recall']:.2f}%; required {config.min_recall:.2f}%"),
    ]
    result = verdict(checks, shown_when_passed=4)
    # a drop not distinguishable from noise is not known to have failed: the wording below names failures
    failed = [k for k in checks if not k.passed and k.outcome != "noise"]
    ok = {k.name: k.passed or k.outcome == "noise" for k in checks}
    summary = result["summary"]
    if failed:
        calib = {"mean_tp_score_drop", "recall_drop", "min_recall"}
        if not ok["map50_drop"] and not ok["mean_tp_score_drop"] and c["mean_tp_score"] < thr:
            summary = (
                f"confidences collapsed: the mean true-positive score fell {s['mean_tp_score']:.3f} -> "
                f"{c['mean_tp_score']:.3f}, under the deployment threshold {thr:g} (a calibrator that clips "
                "the sigmoid score output does this); keep the class-score head in float "
                "(quantize.float_layers) or use quantize method auto. " + summary)
        elif ok["map50_drop"] and any(k.name in calib for k in failed):
            summary = (
                f"confidences collapsed while mAP held: mAP@0.5 moved only {map_drop:+.2f} pt but the "
                f"mean true-positive score fell {s['mean_tp_score']:.3f} -> {c['mean_tp_score']:.3f} and "
                f"recall at score >= {thr:g} {s['recall']:.1f}% -> {c['recall']:.1f}%, so the deployed "
                "threshold finds far fewer objects; keep the class-score head in float "
                "(quantize.float_layers) or use quantize method auto. " + summary)
        elif ok["map50_drop"] and not ok["map50_95_drop"]:
            summary = (
                f"box precision collapsed while mAP@0.5 held: mAP@0.5 moved only {c['map50'] - s['map50']:+.2f} pt but "
                f"mAP@0.5:0.95 fell {loc_drop:.2f} pt ({s['map50_95']:.2f} -> {c['map50_95']:.2f}), so boxes "
                "still overlap their objects but no longer fit them; keep the box head (its convs, DFL) in float "
                "(quantize.float_layers), try another calibrator, or use quantize method auto. " + summary)
    return {**result, "summary": summary}


def check_detector(model, data: Splits, task) -> None:
    """Preflight for a detection recipe: the model's outputs fit the decoder, the labels are boxes.

    Raises:
        ConfigError: the outputs do not match the configured heads (expected and actual shapes
            named), or the decode or loss function cannot be imported.
        DataError: the labels are not (k, 5) boxes, or a decode function returns the wrong shape.
    """
    import torch

    y0 = data.y_test[0] if len(data.y_test) else None
    if y0 is None or np.asarray(y0).ndim != 2 or np.asarray(y0).shape[-1] != 5:
        raise DataError("data: a detection task needs y_* object arrays of (k, 5) boxes "
                        "[x1, y1, x2, y2, class] per image; got labels like "
                        f"{np.asarray(y0).shape if y0 is not None else 'none'}")
    x = np.ascontiguousarray(data.x_test[:2])
    arrays = [o.numpy() for o in forward_tensors(model.eval(), torch.from_numpy(x))]
    decode_outputs(arrays, task, output_names(len(arrays)))
    if getattr(task, "loss_fn", ""):  # before anything trains: one line if it cannot be imported
        from edgeslim.components.tasks.detection.runtime import load_user_function

        load_user_function(task.loss_fn, "task.loss_fn")
