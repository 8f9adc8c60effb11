"""Activation ranges for symmetric int8, chosen from calibration data.

ONNX Runtime's own Entropy calibrator runs with 128 bins and gives the same
ranges as MinMax (see DESIGN.md), so edgeslim collects |x| histograms itself
(TensorRT-style, 2048 bins by default) and chooses each tensor's clipping
threshold ``amax`` by one of four rules:

- ``minmax``: the largest |x| seen;
- ``percentile``: the given percentile of the non-zero |x|;
- ``entropy``: the threshold whose 128-level quantized histogram is closest
  in KL divergence to the original (TensorRT's IInt8EntropyCalibrator2 rule);
- ``mse``: the threshold with the least expected squared quantization error.
"""

from __future__ import annotations

import numpy as np

CALIBRATORS = ("minmax", "entropy", "percentile", "mse")
_QLEVELS = 128  # int8 symmetric: 127 positive levels plus zero


def collect(session_run, tensor_names: list[str], batches, num_bins: int) -> dict[str, tuple[float, np.ndarray]]:
    """Two passes over ``batches``: |x| maxima, then |x| histograms on [0, amax].

    Args:
        session_run: ``f(batch) -> list[np.ndarray]`` giving the named tensors in order.
        tensor_names: names of the tensors ``session_run`` returns.
        batches: a re-iterable sequence of input batches.
        num_bins: histogram bins.

    Returns:
        name -> (amax, histogram of |x|).
    """
    amax = {n: 0.0 for n in tensor_names}
    for b in batches:
        for n, v in zip(tensor_names, session_run(b)):
            if v.size:
                amax[n] = max(amax[n], float(np.max(np.abs(v))))
    hists = {n: np.zeros(num_bins, dtype=np.float64) for n in tensor_names}
    for b in batches:
        for n, v in zip(tensor_names, session_run(b)):
            if v.size and amax[n] > 0:
                # Exact zeros (ReLU outputs, padding, blank pixels) are exact in symmetric
                # int8 whatever the range: counting them only drags entropy and percentile
                # thresholds towards zero and clips the values that matter.
                a = np.abs(v)
                h, _ = np.histogram(a[a > 0], bins=num_bins, range=(0.0, amax[n]))
                hists[n] += h
    return {n: (amax[n], hists[n]) for n in tensor_names}


def choose_amax(amax: float, hist: np.ndarray, method: str, percentile: float = 99.99) -> float:
    """The clipping threshold for one tensor."""
    if amax <= 0 or hist.sum() == 0 or method == "minmax":
        return float(amax)
    edges = np.linspace(0.0, amax, len(hist) + 1)
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(edges[min(i + 1, len(hist))])
    if method == "entropy":
        return float(edges[_entropy_bin(hist)])
    if method == "mse":
        return float(_mse_threshold(hist, edges))
    raise ValueError(f"unknown calibrator {method!r}; known: {', '.join(CALIBRATORS)}")


def _entropy_bin(hist: np.ndarray) -> int:
    """TensorRT's KL-divergence search: the end bin (exclusive) of the best threshold."""
    n = len(hist)
    if n <= _QLEVELS:
        return n
    hist = hist.astype(np.float64)
    best_i, best_kl = n, np.inf
    # Stride keeps the search cheap on 2048 bins without changing its answer much.
    stride = max(1, (n - _QLEVELS) // 256)
    for i in range(_QLEVELS, n + 1, stride):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # clipped mass goes to the last bin
        nonzero = hist[:i] != 0
        # Merge i bins into 128 levels, then expand back over the non-zero bins.
        chunks = np.array_split(np.arange(i), _QLEVELS)
        q = np.zeros(i, dtype=np.float64)
        for idx in chunks:
            nz = nonzero[idx]
            cnt = nz.sum()
            if cnt:
                q[idx[nz]] = hist[idx].sum() / cnt
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q = q / qs
        mask = p > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


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
