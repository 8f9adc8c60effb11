"""Activation ranges for symmetric int8, chosen from calibration data.

ONNX Runtime's own Entropy calibrator runs with 128 bins and gives the same
ranges as MinMax (docs/design.md), so edgeslim collects |x| histograms itself
(TensorRT-style, 2048 bins or more by default) and chooses each tensor's clipping
threshold ``amax`` with a calibrator. A calibrator is a function

    calibrator(top: float, hist: np.ndarray, *, percentile: float) -> float

given the histogram of the non-zero |x| on ``[0, top]`` (``len(hist)`` equal bins, at least the
config's ``quantize.num_bins``, never all zero, ``top > 0``; the largest |x| seen lies in the last
bin, less than one bin below ``top``); it returns the threshold, in ``(0, top]`` for the built-ins,
and :func:`choose_amax` cuts a threshold above the largest |x| down to it. ``percentile`` is the
config's ``quantize.percentile`` (calibrators other than ``percentile`` ignore it). A calibrator
that needs only the largest |x| sets the attribute ``needs_histogram = False`` on itself, and
calibration then bins nothing. Either way calibration is one pass over the data (:func:`collect`).
Calibrators are registered in the
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

    The histogram is built as the batches come (as pytorch-quantization's ``HistogramCalibrator``
    builds it), so calibration runs the model over the data once. Its bin width is the largest |x| of
    the tensor's first two batches over ``num_bins``: two, because the first batch of
    :func:`~edgeslim.components.quantize.ptq.calibrate_ranges` is the one image that sizes the others. A later batch with a larger |x| extends the
    histogram with more bins of the same width, so no bin is ever coarser than that; only past
    :data:`GROWTH` times ``num_bins`` bins (a first batch far smaller than the rest) are neighbouring
    bins merged, by the power of two that brings it back under. See :class:`_Histogram` for the bins.

    Args:
        session_run: ``f(batch) -> list[np.ndarray]`` giving the named tensors in order.
        tensor_names: names of the tensors ``session_run`` returns.
        batches: an iterable of input batches, read once.
        num_bins: the least number of histogram bins up to the largest |x|.
        histograms: ``False`` keeps only the maxima (``minmax`` reads nothing else), and the
            histograms are empty.

    Returns:
        name -> (amax, hist, top): the largest |x|, and the counts of the non-zero |x| in
        ``len(hist)`` bins of equal width on ``[0, top]``, ``top`` less than one bin above ``amax``
        (``len(hist) >= num_bins`` unless ``amax`` is 0). NaN and infinite values are left out of both.
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
        return dict(zip(tensor_names, pool.map(lambda n: hists[n].result(), tensor_names)))


def _binning_threads() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(4, os.cpu_count() or 1))


GROWTH = 16  # a histogram holds at most this many times num_bins bins before its bins are merged
_BLOCK = 1 << 16  # values per step: a few temporaries of this size stay in cache


class _Histogram:
    """The largest |x| and the |x| histogram of one tensor over the batches seen (:func:`collect`).

    Bin ``j`` holds the |x| with ``floor(|x| * scale) == j``, the product rounded in the tensor's
    float type (float32 for float32 and narrower): bins of width ``1 / scale`` closed on the left,
    as ``np.histogram``'s are, their edges exact to within that rounding, the same for every batch
    (so the counts do not depend on the batching once ``scale`` is set). ``scale`` is chosen so that
    the largest |x| it is set from lies at most on the upper edge of bin ``num_bins - 1``, which is
    closed at the top as ``np.histogram``'s last bin is; on equally spaced values (pixels ``k/16``)
    the bins then fall where ``np.histogram(|x|, num_bins, (0, amax))``'s do. Halving ``scale`` is
    exact, so merging bins in pairs gives the counts the coarser scale gives directly.
    Exact zeros (ReLU outputs, padding, blank pixels) are exact in symmetric int8 whatever the
    range: counting them would only drag entropy and percentile thresholds towards zero and clip
    the values that matter, so they are left out.
    """

    def __init__(self, num_bins: int, histograms: bool):
        self.num_bins, self.histograms = num_bins, histograms
        self.amax = 0.0
        self.scale = None  # bins per unit of |x|, a scalar of the binning dtype (_set_scale)
        self.counts = np.zeros(0, dtype=np.int64)
        self.held: list[tuple[np.ndarray, float]] = []  # non-zero batches (and their largest |x|) not yet binned

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
        if m <= 0:  # all zeros: nothing to count
            return
        self.amax = max(self.amax, m)
        if not self.histograms:
            return
        self.held.append((v, m))
        if self.scale is None and len(self.held) < 2:
            return
        self._bin_held()

    def _bin_held(self) -> None:
        if self.scale is None:
            self._set_scale(self.held[0][0].dtype)
        for v, m in self.held:
            self._bin(v.reshape(-1), m)
        self.held = []

    def _set_scale(self, dtype) -> None:
        dtype = np.result_type(dtype, np.float32)
        if dtype != np.float64 and self.num_bins / self.amax > float(np.finfo(np.float32).max):
            dtype = np.dtype(np.float64)  # a subnormal largest |x|: float32 cannot hold its scale
        s = dtype.type(self.num_bins / self.amax)
        while dtype.type(self.amax) * s > self.num_bins:  # the largest |x| on or below the top edge
            s = np.nextafter(s, dtype.type(0))
        self.scale = s

    def _bin(self, flat: np.ndarray, m: float) -> None:
        """Counts the non-zero |x| of ``flat`` (largest |x| ``m``) into the bins, first extending them to
        ``m``, or merging them past ``GROWTH * num_bins``."""
        k = 0  # (in float64: the product in the binning dtype may overflow before the merge)
        while m * float(self.scale) / 2 ** k >= GROWTH * self.num_bins:
            k += 1
        if k:  # merge 2**k neighbouring bins into one
            f = min(1 << k, len(self.counts))  # (all of them into bin 0 when 2**k is more)
            c = np.concatenate([self.counts, np.zeros(-len(self.counts) % f, dtype=np.int64)])
            self.counts, self.scale = c.reshape(-1, f).sum(axis=1), np.ldexp(self.scale, -k)
        s = self.scale
        last = int(s.dtype.type(m) * s)
        if last >= len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(last + 1 - len(self.counts), dtype=np.int64)])
        n, zeros = len(self.counts), 0
        buf = np.empty(min(_BLOCK, flat.size), dtype=s.dtype)
        for i in range(0, flat.size, _BLOCK):
            a = np.abs(flat[i:i + _BLOCK], out=buf[:min(_BLOCK, flat.size - i)])
            zeros += len(a) - int(np.count_nonzero(a))
            np.multiply(a, s, out=a)
            self.counts += np.bincount(a.astype(np.intp), minlength=n)
        self.counts[0] -= zeros

    def result(self) -> tuple[float, np.ndarray, float]:
        if self.held:  # a single non-zero batch
            self._bin_held()
        if self.scale is None:
            return self.amax, np.zeros(1, dtype=np.float64), self.amax
        f = self.scale.dtype.type(self.amax) * self.scale
        n = int(f) if f == int(f) else int(f) + 1  # the largest |x| on an edge: the bin below holds it
        hist = self.counts.astype(np.float64)
        hist[n - 1] += hist[n:].sum()
        return self.amax, hist[:n], max(n / float(self.scale), self.amax)  # (the quotient may round below)


def choose_amax(amax: float, hist: np.ndarray, method: str, percentile: float = 99.99,
                top: float | None = None) -> float:
    """The clipping threshold for one tensor, by the calibrator registered as ``method``.

    ``hist`` covers ``[0, top]`` (``top`` defaults to ``amax``, the largest |x| seen; :func:`collect`
    gives both). A threshold in ``(amax, top]`` is ``amax``: the histogram reaches past ``amax`` only
    to end on a whole bin. A tensor that is all zeros (``amax`` 0 or an empty histogram) keeps
    ``amax`` whatever the calibrator.

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
