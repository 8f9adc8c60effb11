"""The calibrators choose different, sensible clipping ranges from the same histogram."""

from __future__ import annotations

import numpy as np

from edgeslim.components.quantize import calibrate


def _stats(x):
    (name_stats,) = calibrate.collect(lambda b: [b], ["t"], [x], 2048).values()
    return name_stats


def test_minmax_is_the_largest_magnitude():
    x = np.array([-3.0, 0.5, 2.0], dtype=np.float32)
    amax, hist = _stats(x)
    assert calibrate.choose_amax(amax, hist, "minmax") == 3.0


def test_clipping_calibrators_cut_a_rare_outlier():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [80.0]]).astype(np.float32)
    amax, hist = _stats(x)
    assert amax == 80.0
    pct = calibrate.choose_amax(amax, hist, "percentile", 99.99)
    ent = calibrate.choose_amax(amax, hist, "entropy")
    mse = calibrate.choose_amax(amax, hist, "mse")
    for t in (pct, ent):
        assert 2.0 < t < 20.0  # the bulk (|x| up to ~4.5 sigma) is kept, the outlier is clipped
    # MSE weighs the lone outlier quadratically: it clips less, but still clips.
    assert pct < mse < amax
    assert calibrate.choose_amax(amax, hist, "percentile", 100.0) == amax


def test_percentile_grows_with_the_percentile():
    x = np.random.default_rng(1).exponential(1.0, 100_000).astype(np.float32)
    amax, hist = _stats(x)
    assert calibrate.choose_amax(amax, hist, "percentile", 99.0) < calibrate.choose_amax(amax, hist, "percentile", 99.99)
