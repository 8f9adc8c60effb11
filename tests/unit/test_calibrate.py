"""The calibrators choose different, sensible clipping ranges from the same histogram."""

from __future__ import annotations

import numpy as np

from edgeslim.components.quantize import calibrate


def _stats(x):
    (name_stats,) = calibrate.collect(lambda b: [b], ["t"], [x], 2048).values()
    return name_stats


def _choose(stats, method, percentile=99.99):
    amax, hist, top = stats
    return calibrate.choose_amax(amax, hist, method, percentile, top=top)


def test_minmax_is_the_largest_magnitude():
    x = np.array([-3.0, 0.5, 2.0], dtype=np.float32)
    assert _choose(_stats(x), "minmax") == 3.0


def test_clipping_calibrators_cut_a_rare_outlier():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [80.0]]).astype(np.float32)
    stats = _stats(x)
    assert stats[0] == 80.0
    pct, ent, mse = (_choose(stats, m) for m in ("percentile", "entropy", "mse"))
    for t in (pct, ent):
        assert 2.0 < t < 20.0  # the bulk (|x| up to ~4.5 sigma) is kept, the outlier is clipped
    # MSE weighs the lone outlier quadratically: it clips less, but still clips.
    assert pct < mse < 80.0
    assert _choose(stats, "percentile", 100.0) == 80.0


def test_percentile_grows_with_the_percentile():
    x = np.random.default_rng(1).exponential(1.0, 100_000).astype(np.float32)
    stats = _stats(x)
    assert _choose(stats, "percentile", 99.0) < _choose(stats, "percentile", 99.99)


def _numpy_abs_histogram(x, amax, bins):
    a = np.abs(x)
    return np.histogram(a[a > 0], bins=bins, range=(0.0, amax))[0]


def _moved_off_an_edge(x, hist, top):
    """Whether ``hist`` is np.histogram's on the same bins but for values within float rounding of an edge."""
    a = np.abs(x[np.isfinite(x)]).astype(np.float64)
    a = a[a > 0]
    ref = np.histogram(a, bins=len(hist), range=(0.0, top))[0]
    pos = a * len(hist) / top
    near = np.abs(pos - np.round(pos)) <= 1e-5 * np.maximum(pos, 1)  # within float32 rounding of an edge
    return int(np.abs(hist - ref).sum()) <= 2 * int(np.count_nonzero(near))


def test_one_batch_bins_as_numpy_does_and_equally_spaced_values_exactly():
    # a single batch: num_bins bins up to its largest |x|, np.histogram's bins on [0, amax] but for
    # values within float rounding of an edge; exact zeros are left out
    rng = np.random.default_rng(0)
    samples = [rng.normal(0, 1, 200_000), np.maximum(rng.normal(0, 1, 150_000), 0),  # ReLU: half zeros
               rng.standard_cauchy(70_000)]
    for x in samples:
        for dtype in (np.float32, np.float64):
            v = x.astype(dtype)
            for bins in (2048, 1000, 7):
                (amax, hist, top), = calibrate.collect(lambda b: [b], ["t"], [v], bins).values()
                assert len(hist) == bins and amax <= top < amax * (1 + 1e-6) and amax == np.abs(v).max()
                assert hist.sum() == np.count_nonzero(v) and _moved_off_an_edge(v, hist, top)
    # Grey levels k/16 and quarter steps (pixels, quantized inputs) lie on the bin edges of [0, amax]: every
    # one is counted in np.histogram's bin, which is what entropy's threshold on such a tensor turns on.
    for x in (rng.integers(0, 17, 90_000) / 16, rng.integers(-4, 5, 90_000) * 0.25):
        for dtype in (np.float32, np.float64):
            v = x.astype(dtype)
            for bins in (2048, 1000, 7):
                (amax, hist, top), = calibrate.collect(lambda b: [b], ["t"], [v], bins).values()
                assert top == amax and np.array_equal(hist, _numpy_abs_histogram(v, amax, bins))


def test_later_larger_values_extend_the_bins_and_the_batching_does_not_change_the_counts():
    rng = np.random.default_rng(2)
    first = [rng.normal(0, 0.5, 5_000).astype(np.float32), rng.normal(0, 1, 20_000).astype(np.float32)]
    rest = [rng.normal(0, 2, 30_000).astype(np.float32), rng.normal(0, 1, 30_000).astype(np.float32)]
    rest[0][:5] = 0.0
    width = float(np.abs(np.concatenate(first)).max()) / 2048  # set by the first two batches
    runs = [first + rest, first + rest[::-1], first + [np.concatenate(rest)]]
    out = [calibrate.collect(lambda b: [b], ["t"], batches, 2048)["t"] for batches in runs]
    amax, hist, top = out[0]
    for a, h, t in out[1:]:  # same bins, same counts whatever the order and grouping after the first two
        assert a == amax and t == top and np.array_equal(h, hist)
    everything = np.concatenate(first + rest)
    assert amax == np.abs(everything).max() and hist.sum() == np.count_nonzero(everything)
    # the bins keep the first batches' width, and reach the largest |x| within one of them
    assert len(hist) > 2048 and abs(top / len(hist) - width) < 1e-6 * width and amax <= top < amax + width
    assert _moved_off_an_edge(everything, hist, top)


def test_a_first_batch_far_smaller_than_the_rest_merges_bins_in_powers_of_two():
    rng = np.random.default_rng(3)
    small, big = rng.normal(0, 1e-3, 10_000), rng.normal(0, 10, 100_000)
    batches = [small.astype(np.float32), small[::-1].astype(np.float32), big.astype(np.float32)]
    amax, hist, top = calibrate.collect(lambda b: [b], ["t"], batches, 2048)["t"]
    assert 2048 <= len(hist) <= calibrate.GROWTH * 2048 and amax <= top < amax + top / len(hist)
    assert hist.sum() == np.count_nonzero(np.concatenate(batches))
    assert _moved_off_an_edge(np.concatenate(batches), hist, top)
    # sixty decades above the first batches: all of those fall in bin 0, the new values in the last bins
    batches = [np.array([1e-30, -2e-30], np.float32), np.array([3e-30], np.float32),
               np.array([1e30, -5e29, 0.0], np.float32)]
    amax, hist, top = calibrate.collect(lambda b: [b], ["t"], batches, 2048)["t"]
    assert amax == np.float32(1e30) and len(hist) <= calibrate.GROWTH * 2048 and hist.sum() == 5
    assert hist[0] == 3 and hist[-1] == 1 and _choose((amax, hist, top), "minmax") == amax


def test_nan_and_infinite_values_are_left_out():
    batches = [np.array([1.0, -2.0, 0.0], dtype=np.float32), np.array([np.nan, 5.0, -0.5, np.inf], dtype=np.float32)]
    (amax, hist, top), = calibrate.collect(lambda b: [b], ["t"], batches, 16).values()
    assert amax == 5.0 == top and hist.sum() == 4
    assert np.array_equal(hist, _numpy_abs_histogram(np.array([1.0, -2.0, 5.0, -0.5]), 5.0, 16))
    (amax, hist, top), = calibrate.collect(lambda b: [b], ["t"], [np.full(3, np.nan, np.float32)], 16).values()
    assert amax == 0.0 and calibrate.choose_amax(amax, hist, "entropy", top=top) == 0.0


def test_every_calibrator_reads_the_batches_once():
    reads = []

    def run(b):
        reads.append(len(b))
        return [b]

    x = np.random.default_rng(0).normal(0, 1, (6, 50)).astype(np.float32)
    batches = [x[:4], x[4:]]
    (amax, hist, _), = calibrate.collect(run, ["t"], batches, 2048, histograms=False).values()
    assert reads == [4, 2] and amax == float(np.abs(x).max()) and hist.sum() == 0
    reads.clear()
    (amax2, hist2, _), = calibrate.collect(run, ["t"], batches, 2048).values()
    assert reads == [4, 2] and amax2 == amax and hist2.sum() == np.count_nonzero(x)


def test_histograms_binned_on_several_threads_are_the_ones_binned_on_one(monkeypatch):
    # a batch's tensors are binned concurrently; every count must be the single-threaded one
    rng = np.random.default_rng(1)
    tensors = [rng.normal(0, s, (3, 40_000)).astype(np.float32) for s in (0.1, 1.0, 30.0, 1e-3, 5.0)]
    tensors[2][0, :7] = 0.0  # exact zeros are taken off bin 0
    names = [f"t{i}" for i in range(len(tensors))]
    batches = [0, 1, 2]

    def run(b):
        return [t[b:b + 1] for t in tensors]

    out = {}
    for threads in (1, 4):
        monkeypatch.setattr(calibrate, "_binning_threads", lambda threads=threads: threads)
        out[threads] = calibrate.collect(run, names, batches, 2048)
    for n in names:
        assert out[1][n][0] == out[4][n][0] and np.array_equal(out[1][n][1], out[4][n][1])
    assert out[4]["t2"][1].sum() == np.count_nonzero(tensors[2])


class _CountedRows:
    """A lazy train split over an array that counts the rows read."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.rows_read = x, x.shape, x.dtype, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        out = self.x[key]
        self.rows_read += len(out) if out.ndim == self.x.ndim else 1
        return out


def _reference_ranges(path, data, cfg):
    """Each tensor's (amax, range) from all images at once: np.histogram of |x| > 0 on [0, amax]."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeslim.components.common.onnx_runtime import session_with_outputs
    from edgeslim.components.quantize import ptq

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    names = ptq._float_tensors(model)
    x = np.asarray(data.x_train.x if isinstance(data.x_train, _CountedRows) else data.x_train)
    x = x[data.calibration_rows(cfg.num_samples, cfg.seed)]
    with session_with_outputs(model, names) as sess:
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    out = {}
    for n in names:
        amax = float(np.abs(outs[n]).max())
        hist = _numpy_abs_histogram(outs[n], amax, cfg.num_bins).astype(np.float64) if amax > 0 else np.zeros(1)
        out[n] = amax, calibrate.choose_amax(amax, hist, cfg.calibrator, cfg.percentile)
    return out


def test_calibration_reads_each_image_once_and_its_ranges_are_the_whole_sets(tmp_path, monkeypatch):
    import torch

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize import ptq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, torch.rand(1, 3, 16, 16), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    x = np.random.default_rng(0).normal(0, 1, (40, 3, 16, 16)).astype(np.float32)
    y = np.zeros(40, dtype=np.int64)
    for budget in (ptq.CALIB_MEMORY, 1):  # one batch beside the first image; batches of one image
        monkeypatch.setattr(ptq, "CALIB_MEMORY", budget)
        for calibrator in ("entropy", "percentile", "mse", "minmax"):
            train = _CountedRows(x[:30])
            data = Splits(train, y[:30], x[30:35], y[30:35], x[35:], y[35:])
            cfg = PTQQuantizeConfig(calibrator=calibrator, num_samples=24)
            ranges = ptq.calibrate_onnx(path, cfg, data)
            assert train.rows_read == 24  # the image that sizes the batches is the first calibrated
            ref = _reference_ranges(path, data, cfg)
            assert ranges.keys() == ref.keys()
            # Bins in units of the whole set's bin (amax / num_bins) that each range lies from the reference's.
            off = {n: abs(ranges[n] - r) / (amax / cfg.num_bins) for n, (amax, r) in ref.items()}
            if budget > 1:  # the first two batches hold every image: the whole set's bins, to float rounding
                assert max(off.values()) < 0.01, (calibrator, off)
            elif calibrator != "entropy":  # finer bins from two images' largest |x|: within one bin
                assert max(off.values()) <= 1.0, (calibrator, off)
            # (entropy on these 12,288 values a tensor is not checked with batches of one: the whole set's
            # own threshold for the sigmoid moves from 0.70 to 0.31 between 2,045 and 2,050 bins)
