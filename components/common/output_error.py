"""The int8 output error against its own fp32 model, over the test split: what the report's output-error
chart draws for every task (:func:`output_error`), and the accumulator a task that runs its models its own
way feeds (:class:`OutputError`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


class OutputError:
    """int8 minus fp32 over every output value of a split, batch by batch: per-output SQNR exactly,
    the error distribution from a seeded sample (at most ``2 * cap`` values over all outputs are kept, as
    float32, however long the split and however many outputs the model has)."""

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
            self.samples.setdefault(name, []).append(e.astype(np.float32))
        total = sum(k.size for kept in self.samples.values() for k in kept)
        if total > 2 * self.cap:  # thinned evenly to the cap: every output and every batch keeps its share
            for kept in self.samples.values():
                both = np.concatenate(kept)
                keep = max(1, round(both.size * self.cap / total))
                kept[:] = [both[np.sort(self.rng.choice(both.size, keep, replace=False))]]

    def result(self, reference: str, bins: int = 41) -> dict[str, Any]:
        outputs, normalized = [], []
        for name in self.sqnr:
            rms = math.sqrt(self.power[name] / max(self.count[name], 1)) or 1.0
            db = self.sqnr[name].db()
            outputs.append({"name": name, "sqnr_db": round(db, 3) if math.isfinite(db) else None,
                            "rms": round(rms, 6), "values": self.count[name]})
            normalized.append(np.concatenate(self.samples[name]).astype(np.float64) / rms)
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


def reference_onnx(*, parent_onnx: str | Path, student_onnx: str | Path | None) -> tuple[Path, str]:
    """The fp32 model the candidate was quantized from (the student when distill/prune made one, else the
    parent), and how the report names it."""
    own = student_onnx is not None and Path(student_onnx).resolve() != Path(parent_onnx).resolve()
    if own:
        return Path(student_onnx), "the fp32 student it was quantized from"
    return Path(parent_onnx), "the fp32 parent it was quantized from"


def output_error(candidate_onnx: str | Path, *, parent_onnx: str | Path, data,
                 student_onnx: str | Path | None = None) -> dict[str, Any]:
    """Every output of the candidate against its own fp32 model on the test split, a batch at a time (a lazy
    split is read once), in Q/DQ semantics."""
    from edgeslim.components.common.onnx_runtime import make_session, run_outputs

    ref_path, reference = reference_onnx(parent_onnx=parent_onnx, student_onnx=student_onnx)
    err = OutputError()
    x = data.x_test
    ref_sess = make_session(ref_path, basic=True)
    cand_sess = make_session(candidate_onnx, basic=True)
    for i in range(0, len(x), 256):
        xb = np.ascontiguousarray(x[i:i + 256])
        r_names, r_outs = run_outputs(ref_sess, xb, batch=len(xb))
        _, c_outs = run_outputs(cand_sess, xb, batch=len(xb))
        err.add((r_outs, r_names), (c_outs, r_names))
    return err.result(reference)
