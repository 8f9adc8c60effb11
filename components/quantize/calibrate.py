"""Activation ranges for symmetric int8, chosen from calibration data.

ONNX Runtime's own Entropy calibrator runs with 128 bins and gives the same
ranges as MinMax (docs/design.md), so edgeslim collects |x| histograms itself
(TensorRT-style, 2048 bins by default) and chooses each tensor's clipping
threshold ``amax`` with a calibrator. A calibrator is a function

    calibrator(amax: float, hist: np.ndarray, *, percentile: float) -> float

given the largest |x| seen and the histogram of the non-zero |x| on ``[0, amax]``
(``len(hist)`` equal bins, never all zero, ``amax > 0``); it returns the threshold, in
``(0, amax]`` for the built-ins. ``percentile`` is the config's ``quantize.percentile``
(calibrators other than ``percentile`` ignore it). A calibrator that needs only ``amax`` sets the
attribute ``needs_histogram = False`` on itself, and calibration then makes one pass over the data
instead of two. Calibrators are registered in the
entry-point group ``edgeslim.calibrators`` (:data:`~edgeslim.components.common.stage_configs.CALIBRATORS`),
the built-in four in edgeslim's own ``pyproject.toml``:

- ``minmax``: the largest |x| seen;
- ``percentile``: the given percentile of the non-zero |x|;
- ``entropy``: the threshold whose 128-level quantized histogram is closest
  in KL divergence to the original (TensorRT's IInt8EntropyCalibrator2 rule);
- ``mse``: the threshold with the least expected squared quantization error.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgeslim.components.common.stage_configs import CALIBRATORS

_QLEVELS = 128  # int8 symmetric: 127 positive levels plus zero


def collect(session_run, tensor_names: list[str], batches, num_bins: int,
            histograms: bool = True) -> dict[str, tuple[float, np.ndarray]]:
    """Two passes over ``batches``: |x| maxima, then |x| histograms on [0, amax].

    Args:
        session_run: ``f(batch) -> list[np.ndarray]`` giving the named tensors in order.
        tensor_names: names of the tensors ``session_run`` returns.
        batches: a re-iterable of input batches (read once per pass, so they need not be held).
        num_bins: histogram bins.
        histograms: ``False`` skips the second pass (``minmax`` needs only the maxima); the
            histograms are then all zero.

    Returns:
        name -> (amax, histogram of |x|).
    """
    amax = {n: 0.0 for n in tensor_names}
    odd = set()  # tensors with a NaN in some batch: their histograms take np.histogram's own path
    for b in batches:
        for n, v in zip(tensor_names, session_run(b)):
            if v.size:  # max |x| without a copy of the tensor
                hi, lo = float(v.max()), float(v.min())
                amax[n] = max(amax[n], hi, -lo)
                if math.isnan(hi) or math.isnan(lo):
                    odd.add(n)
    hists = {n: np.zeros(num_bins, dtype=np.float64) for n in tensor_names}
    if not histograms:
        return {n: (amax[n], hists[n]) for n in tensor_names}

    def add(item) -> None:  # each tensor's histogram is its own: the threads never share one
        n, v = item
        if v.size and amax[n] > 0:
            hists[n] += abs_histogram(v, amax[n], num_bins, exact_path=n in odd)

    # Binning is numpy on blocks that release the GIL, between inference runs that leave the cores idle:
    # a batch's tensors are binned on as many threads as there are cores (the counts are the same).
    with ThreadPoolExecutor(_binning_threads(), thread_name_prefix="edgeslim-calib-bin") as pool:
        for b in batches:
            list(pool.map(add, zip(tensor_names, session_run(b))))
    return {n: (amax[n], hists[n]) for n in tensor_names}


def _binning_threads() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(4, os.cpu_count() or 1))


_BLOCK = 1 << 16  # values per step: a few temporaries of this size stay in cache


def abs_histogram(v: np.ndarray, amax: float, num_bins: int, exact_path: bool = False) -> np.ndarray:
    """``np.histogram(|v|[|v| > 0], num_bins, range=(0, amax))[0]``, bin for bin, without copies of ``v``
    (``amax`` is at least every finite |v|, as :func:`collect`'s first pass makes it).

    Exact zeros (ReLU outputs, padding, blank pixels) are exact in symmetric int8 whatever the
    range: counting them only drags entropy and percentile thresholds towards zero and clips the
    values that matter. They fall in bin 0, so they are counted with the rest and taken off there.
    The bin of each value is numpy's own computation (same dtype, same scaling, the same one-ulp
    edge corrections where they can apply) on blocks of |v|, followed by ``np.bincount``; numpy's
    path (masking, the compressed copy, its per-block range checks) stays for what it alone
    handles the same way: NaNs, an infinite range, dtypes other than float32/float64 (``exact_path``).
    """
    flat = v.reshape(-1)
    edges = None
    if not exact_path and flat.dtype in (np.float32, np.float64) and np.isfinite(amax):
        edges = np.linspace(0.0, amax, num_bins + 1, dtype=flat.dtype)
    if edges is None or edges[1] == 0:
        a = np.abs(v)
        return np.histogram(a[a > 0], bins=num_bins, range=(0.0, amax))[0]
    den, num = flat.dtype.type(amax), flat.dtype.type(num_bins)
    # numpy's scaled position is a few ulps from exact, so its one-bin corrections against the edges can
    # only apply within num_bins * 2**-22 of a whole number: this band (16 times wider) gets them, the
    # rest of the values (all but ~1.6% at 2048 bins) need no look-up of their edges.
    band = flat.dtype.type(num_bins * 2.0 ** -18)
    counts = np.zeros(num_bins, dtype=np.intp)
    zeros = 0
    buf = np.empty(min(_BLOCK, flat.size), dtype=flat.dtype)
    for i in range(0, flat.size, _BLOCK):
        a = np.abs(flat[i:i + _BLOCK], out=buf[:min(_BLOCK, flat.size - i)])
        zeros += int(np.count_nonzero(a == 0))
        f = (a / den) * num
        np.minimum(f, num_bins - 1, out=f)  # |x| == amax: the last bin holds its right edge
        idx = f.astype(np.intp)
        frac = f - np.floor(f)
        # (below edge 1 only the upper correction can apply: zeros, often half a tensor, need none)
        near = np.flatnonzero((frac > 1 - band) | ((frac < band) & (f >= 1)))
        if near.size:
            x, k = a[near], idx[near]
            k -= x < edges[k]
            k += (x >= edges[k + 1]) & (k != num_bins - 1)
            idx[near] = k
        counts += np.bincount(idx, minlength=num_bins)
    counts[0] -= zeros
    return counts


def choose_amax(amax: float, hist: np.ndarray, method: str, percentile: float = 99.99) -> float:
    """The clipping threshold for one tensor, by the calibrator registered as ``method``.

    A tensor that is all zeros (``amax`` 0 or an empty histogram) keeps ``amax`` whatever the calibrator.

    Raises:
        ConfigError: no calibrator is registered as ``method``.
    """
    calibrator = CALIBRATORS.get(method)
    if amax <= 0 or hist.sum() == 0:
        return float(amax)
    return float(calibrator(amax, hist, percentile=percentile))


def minmax(amax: float, hist: np.ndarray, *, percentile: float) -> float:
    """The largest |x| seen."""
    return float(amax)


minmax.needs_histogram = False  # one pass over the calibration data: the maxima are all it reads


def needs_histogram(method: str) -> bool:
    """Whether the calibrator registered as ``method`` reads the histograms (the second pass)."""
    return bool(getattr(CALIBRATORS.get(method), "needs_histogram", True))


def percentile(amax: float, hist: np.ndarray, *, percentile: float) -> float:
    """The upper edge of the bin where the share ``percentile`` of the non-zero |x| is reached."""
    edges = np.linspace(0.0, amax, len(hist) + 1)
    cdf = np.cumsum(hist) / hist.sum()
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(i + 1, len(hist))])


def entropy(amax: float, hist: np.ndarray, *, percentile: float) -> float:
    """The threshold with the least KL divergence between the histogram and its 128-level quantization."""
    edges = np.linspace(0.0, amax, len(hist) + 1)
    return float(edges[_entropy_bin(hist)])


def mse(amax: float, hist: np.ndarray, *, percentile: float) -> float:
    """The threshold with the least expected squared quantization error."""
    return float(_mse_threshold(hist, np.linspace(0.0, amax, len(hist) + 1)))


def _entropy_bin(hist: np.ndarray) -> int:
    """TensorRT's KL-divergence search: the end bin (exclusive) of the best threshold.

    For a candidate end bin ``i``, P is the first ``i`` bins with the clipped mass added to
    the last, Q the same bins merged into 128 levels (``np.array_split``'s chunks: the first
    ``i % 128`` one bin wider) and spread back evenly over each level's non-zero bins. Q is
    constant over a level, so KL(P||Q) needs only per-level sums, which prefix sums give for
    every candidate at once.
    """
    n = len(hist)
    if n <= _QLEVELS:
        return n
    hist = hist.astype(np.float64)
    # Stride keeps the search cheap on 2048 bins without changing its answer much.
    stride = max(1, (n - _QLEVELS) // 256)
    ends = np.arange(_QLEVELS, n + 1, stride)  # candidate end bins
    prefix = np.concatenate([[0.0], np.cumsum(hist)])
    nonzero = np.concatenate([[0], np.cumsum(hist != 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.concatenate([[0.0], np.cumsum(np.where(hist > 0, hist * np.log(hist), 0.0))])
    total = prefix[-1]
    # Level boundaries per candidate (rows): levels 0..wide-1 hold width+1 bins, the rest width.
    width, wide = np.divmod(ends, _QLEVELS)
    c = np.arange(_QLEVELS + 1)[None, :]
    w, r = width[:, None], wide[:, None]
    bounds = np.where(c <= r, c * (w + 1), r * (w + 1) + (c - r) * w)
    sums = prefix[bounds[:, 1:]] - prefix[bounds[:, :-1]]
    counts = nonzero[bounds[:, 1:]] - nonzero[bounds[:, :-1]]
    mean = sums / np.maximum(counts, 1)  # Q's value (before normalizing) on a level's non-zero bins
    kept = prefix[ends]  # Q's total: the mass of the first i bins
    last = hist[ends - 1]
    p_last = (total - prefix[ends - 1]) / total  # the last bin with the clipped mass
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mean = np.where(sums > 0, np.log(mean), 0.0)
        # Bins before the last: sum of p log(p / q) with p = h / total and q = mean / kept.
        body_mass = prefix[ends - 1]
        body = (hlogh[ends - 1] - body_mass * np.log(total) + body_mass * np.log(kept)
                - (np.sum(sums * log_mean, axis=1) - np.where(last > 0, last * log_mean[:, -1], 0.0))) / total
        q_last = np.where(last != 0, mean[:, -1] / kept, 1e-12)
        tail = np.where(p_last > 0, p_last * np.log(p_last / q_last), 0.0)
        kl = np.where(kept == 0, np.inf, body + tail)
    low = float(np.min(kl))
    if not np.isfinite(low):
        return n
    # The first of the best (candidates that tie exactly, e.g. over empty bins, differ here by rounding).
    best = int(np.argmax(kl <= low + 1e-12 + 1e-10 * abs(low)))
    return int(ends[best])


def _mse_threshold(hist: np.ndarray, edges: np.ndarray) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    total = hist.sum()
    best_t, best_err = edges[-1], np.inf
    for t in np.linspace(edges[-1] / 64, edges[-1], 128):
        step = t / (_QLEVELS - 1)
        clipped = np.minimum(centers, t)
        q = np.round(clipped / step) * step
        err = float(np.sum(hist * (centers - q) ** 2) / total)
        if err < best_err:
            best_err, best_t = err, t
    return float(best_t)
