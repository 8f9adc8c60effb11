"""Activation ranges for symmetric int8, chosen from calibration data.

ONNX Runtime's own Entropy calibrator runs with 128 bins and gives the same
ranges as MinMax (docs/design.md), so edgeslim collects |x| histograms itself
(TensorRT-style, at least 2048 bins by default) and chooses each tensor's clipping
threshold ``amax`` with a calibrator. A calibrator is a function

    calibrator(top: float, hist: np.ndarray, *, percentile: float) -> float

given the histogram of the non-zero |x| on ``[0, top]`` (``len(hist)`` equal bins, never all zero,
``top > 0``; the largest |x| seen lies in the last bin) and returning the threshold, in ``(0, top]``
for the built-ins; a threshold above the largest |x| that is still within ``top`` is cut to that
largest |x|. ``percentile`` is the config's ``quantize.percentile`` (calibrators other than
``percentile`` ignore it). A calibrator that needs only the largest |x| sets the attribute
``needs_histogram = False`` on itself, and calibration then bins nothing. Either way calibration is
one pass over the data (:func:`collect`). Calibrators are registered in the
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
            histograms: bool = True) -> dict[str, tuple[float, np.ndarray, float]]:
    """One pass over ``batches``: each tensor's largest |x| and, with ``histograms``, its |x| histogram.

    The histogram is built in the same pass (as pytorch-quantization's ``HistogramCalibrator`` does, so
    calibration costs one inference over the data, not two): its bins are ``((j - 1) w, j w]`` with ``w`` a
    power of two, the smallest for which ``num_bins * 2`` bins reach the largest |x| seen so far. When a
    larger value arrives, ``w`` doubles as often as needed and neighbouring bins are merged, which on a
    power-of-two grid is exact: the result is the histogram of all the data on the final grid, whatever the
    batches and their order (between ``num_bins`` and ``2 * num_bins`` bins up to the largest |x|).

    Args:
        session_run: ``f(batch) -> list[np.ndarray]`` giving the named tensors in order.
        tensor_names: names of the tensors ``session_run`` returns.
        batches: an iterable of input batches, read once.
        num_bins: the least number of histogram bins up to the largest |x|.
        histograms: ``False`` keeps only the maxima (``minmax`` reads nothing else); the histograms are
            then empty.

    Returns:
        name -> (amax, histogram of the non-zero |x|, top), the histogram's bins of equal width on
        ``[0, top]``, ``top`` at most one bin above ``amax``. NaN and infinite values are left out.
    """
    hists = {n: _Histogram(num_bins, histograms) for n in tensor_names}

    def add(item) -> None:  # each tensor's histogram is its own: the threads never share one
        n, v = item
        hists[n].add(v)

    # Binning is numpy on blocks that release the GIL, between inference runs that leave the cores idle:
    # a batch's tensors are binned on as many threads as there are cores (the counts are the same).
    with ThreadPoolExecutor(_binning_threads() if histograms else 1, thread_name_prefix="edgeslim-calib-bin") as pool:
        for b in batches:
            list(pool.map(add, zip(tensor_names, session_run(b))))
    return {n: h.result() for n, h in hists.items()}


def _binning_threads() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(4, os.cpu_count() or 1))


_BLOCK = 1 << 16  # values per step: a few temporaries of this size stay in cache


class _Histogram:
    """The |x| maximum and histogram of one tensor over the batches seen (:func:`collect`)."""

    def __init__(self, num_bins: int, histograms: bool):
        self.limit, self.histograms = 2 * num_bins, histograms
        self.amax = 0.0
        self.exp: int | None = None  # bin width 2**exp, set by the first non-zero value
        self.counts = np.zeros(0, dtype=np.int64)

    def _exp_for(self, amax: float) -> int:
        """The smallest exponent ``e`` with ``ceil(amax / 2**e) <= self.limit``."""
        e = math.ceil(math.log2(amax / self.limit))
        while math.ceil(amax / 2.0 ** (e - 1)) <= self.limit:
            e -= 1
        while math.ceil(amax / 2.0 ** e) > self.limit:
            e += 1
        return e

    def add(self, v: np.ndarray) -> None:
        if not v.size:
            return
        hi, lo = float(v.max()), float(v.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):  # NaN or inf: only the finite values count
            v = v[np.isfinite(v)]
            if not v.size:
                return
            hi, lo = float(v.max()), float(v.min())
        m = max(hi, -lo)
        if m <= 0:
            return
        self.amax = max(self.amax, m)
        if not self.histograms:
            return
        exp = self._exp_for(self.amax)
        if self.exp is None:
            self.exp = exp
        elif exp > self.exp:  # merge 2**k neighbouring bins into one: exact on a power-of-two grid
            f = 1 << (exp - self.exp)
            c = np.concatenate([self.counts, np.zeros(-len(self.counts) % f, dtype=np.int64)])
            self.counts, self.exp = c.reshape(-1, f).sum(axis=1), exp
        n = math.ceil(self.amax / 2.0 ** self.exp)
        if n > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(n - len(self.counts), dtype=np.int64)])
        self.counts += _binned(v.reshape(-1), self.exp, len(self.counts))

    def result(self) -> tuple[float, np.ndarray, float]:
        if self.exp is None:
            return self.amax, np.zeros(1, dtype=np.float64), self.amax
        return self.amax, self.counts.astype(np.float64), len(self.counts) * 2.0 ** self.exp


def _binned(flat: np.ndarray, exp: int, n: int) -> np.ndarray:
    """Counts of the non-zero |x| in the bins ``((j - 1) 2**exp, j 2**exp]``, ``j = 1..n`` (every |x| is at
    most ``n * 2**exp``). Scaling by a power of two is exact, so each value's bin is exact, without copies
    of ``flat``: blocks of it are scaled, rounded up and counted in place; exact zeros (ReLU outputs,
    padding) land in bin 0, which is dropped -- they are exact in symmetric int8 whatever the range, and
    counting them would only drag the thresholds towards zero."""
    dtype = flat.dtype if flat.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    if dtype == np.float32 and not -120 < exp < 120:  # 2**-exp beyond float32's range
        dtype = np.dtype(np.float64)
    scale = dtype.type(2.0 ** -exp)
    counts = np.zeros(n + 1, dtype=np.int64)
    buf = np.empty(min(_BLOCK, flat.size), dtype=dtype)
    for i in range(0, flat.size, _BLOCK):
        a = buf[:min(_BLOCK, flat.size - i)]
        np.abs(flat[i:i + _BLOCK], out=a)
        np.multiply(a, scale, out=a)
        np.ceil(a, out=a)
        counts += np.bincount(a.astype(np.intp), minlength=n + 1)
    return counts[1:]


def choose_amax(amax: float, hist: np.ndarray, method: str, percentile: float = 99.99,
                top: float | None = None) -> float:
    """The clipping threshold for one tensor, by the calibrator registered as ``method``.

    ``hist`` covers ``[0, top]`` (``top`` defaults to ``amax``, the largest |x| seen). A threshold in
    ``(amax, top]`` is ``amax``: the histogram reaches past ``amax`` only to end on a whole bin. A tensor
    that is all zeros (``amax`` 0 or an empty histogram) keeps ``amax`` whatever the calibrator.

    Raises:
        ConfigError: no calibrator is registered as ``method``.
    """
    calibrator = CALIBRATORS.get(method)
    if amax <= 0 or hist.sum() == 0:
        return float(amax)
    top = amax if top is None else top
    t = float(calibrator(top, hist, percentile=percentile))
    return float(amax) if amax < t <= top else t


def minmax(top: float, hist: np.ndarray, *, percentile: float) -> float:
    """The largest |x| seen (the histogram's top, which :func:`choose_amax` cuts to it)."""
    return float(top)


minmax.needs_histogram = False  # the maxima are all it reads: calibration bins nothing


def needs_histogram(method: str) -> bool:
    """Whether the calibrator registered as ``method`` reads the histograms."""
    return bool(getattr(CALIBRATORS.get(method), "needs_histogram", True))


def percentile(top: float, hist: np.ndarray, *, percentile: float) -> float:
    """The upper edge of the bin where the share ``percentile`` of the non-zero |x| is reached."""
    edges = np.linspace(0.0, top, len(hist) + 1)
    cdf = np.cumsum(hist) / hist.sum()
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(i + 1, len(hist))])


def entropy(top: float, hist: np.ndarray, *, percentile: float) -> float:
    """The threshold with the least KL divergence between the histogram and its 128-level quantization."""
    edges = np.linspace(0.0, top, len(hist) + 1)
    return float(edges[_entropy_bin(hist)])


def mse(top: float, hist: np.ndarray, *, percentile: float) -> float:
    """The threshold with the least expected squared quantization error."""
    return float(_mse_threshold(hist, np.linspace(0.0, top, len(hist) + 1)))


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
