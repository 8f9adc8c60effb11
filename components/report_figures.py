"""The figures the evaluate task measures for the report's charts, by running the models once more
over the test split: the int8 output error against its own fp32 model (:func:`evaluation_figures`)
and a detector's precision-recall curves (:func:`pr_curve`). The report draws them
(:mod:`edgeslim.components.report_render`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


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
    from edgeslim.components.tasks.detection import _match

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
        from edgeslim.components.tasks.detection import detect_batches

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
