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


def _numpy_abs_histogram(x, amax, bins):
    a = np.abs(x)
    return np.histogram(a[a > 0], bins=bins, range=(0.0, amax))[0]


def test_the_histograms_are_numpys_bin_for_bin():
    # collect bins |x| itself (no masked copy, blocks of 64k, zeros taken off bin 0); every count
    # must be np.histogram's, values on and one ulp beside the bin edges included.
    rng = np.random.default_rng(0)
    amax = float(np.float32(3.7))  # as collect passes it: the float32 max of the data
    samples = [rng.normal(0, 1, 200_000), np.maximum(rng.normal(0, 1, 150_000), 0),  # ReLU: half zeros
               rng.standard_cauchy(70_000), rng.integers(-4, 5, 90_000) * 0.25]
    for x in samples:
        for dtype in (np.float32, np.float64):
            v = x.astype(dtype)
            top = max(float(v.max()), -float(v.min()))
            for bins in (2048, 1000, 7):
                assert np.array_equal(calibrate.abs_histogram(v, top, bins), _numpy_abs_histogram(v, top, bins))
    for bins in (2048, 1000, 7):
        edges = np.linspace(0.0, amax, bins + 1, dtype=np.float32)
        on_edges = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 10)])
        v = np.clip(on_edges, 0, np.float32(amax))
        assert np.array_equal(calibrate.abs_histogram(v, amax, bins), _numpy_abs_histogram(v, amax, bins))
    # A batch with a NaN adds nothing to the maxima; np.histogram drops its NaN and what lies beyond amax.
    batches = [np.array([1.0, -2.0, 0.0], dtype=np.float32), np.array([np.nan, 5.0, -0.5], dtype=np.float32)]
    (amax_nan, hist_nan), = calibrate.collect(lambda b: [b], ["t"], batches, 16).values()
    assert amax_nan == 2.0
    assert np.array_equal(hist_nan, sum(_numpy_abs_histogram(b, 2.0, 16) for b in batches))


def test_minmax_reads_the_batches_once_and_the_others_twice():
    reads = []

    def run(b):
        reads.append(len(b))
        return [b]

    x = np.random.default_rng(0).normal(0, 1, (6, 50)).astype(np.float32)
    batches = [x[:4], x[4:]]
    (amax, hist), = calibrate.collect(run, ["t"], batches, 2048, histograms=False).values()
    assert reads == [4, 2] and amax == float(np.abs(x).max()) and hist.sum() == 0
    reads.clear()
    (amax2, hist2), = calibrate.collect(run, ["t"], batches, 2048).values()
    assert reads == [4, 2, 4, 2] and amax2 == amax and hist2.sum() == np.count_nonzero(x)


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
    """Ranges the way calibration first made them: all images at once, np.histogram of |x| > 0."""
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
        out[n] = calibrate.choose_amax(amax, hist, cfg.calibrator, cfg.percentile)
    return out


def test_calibration_ranges_match_the_first_method_and_images_are_decoded_once_when_they_fit(tmp_path, monkeypatch):
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
    for calibrator in ("entropy", "percentile", "mse", "minmax"):
        train = _CountedRows(x[:30])
        data = Splits(train, y[:30], x[30:35], y[30:35], x[35:], y[35:])
        cfg = PTQQuantizeConfig(calibrator=calibrator, num_samples=24)
        ranges = ptq.calibrate_onnx(path, cfg, data)
        assert ranges == _reference_ranges(path, data, cfg)
        # The one image that sizes the batch, then each calibration image once: minmax makes one pass,
        # the others keep the first pass's images for the second.
        assert train.rows_read == 1 + 24
    # A budget smaller than one image's intermediate tensors: batches of one image, none kept, every
    # image read on both passes, the same ranges.
    train = _CountedRows(x[:30])
    data = Splits(train, y[:30], x[30:35], y[30:35], x[35:], y[35:])
    cfg = PTQQuantizeConfig(calibrator="entropy", num_samples=24)
    monkeypatch.setattr(ptq, "CALIB_MEMORY", 1)
    assert ptq.calibrate_onnx(path, cfg, data) == _reference_ranges(path, data, cfg)
    assert train.rows_read == 1 + 2 * 24


def test_calibration_batches_are_kept_up_to_their_budget_and_the_rest_read_again():
    from edgeslim.components.quantize import ptq

    x = _CountedRows(np.arange(24 * 5, dtype=np.float32).reshape(24, 5))
    rows = np.arange(2, 22)  # 20 rows in batches of 4 (80 bytes each); room for two batches
    batches = ptq._Rows(x, rows, 4, hold=2 * 80 + 79)
    first, second = list(batches), list(batches)
    assert x.rows_read == 20 + 12  # the second pass reads only the three batches not kept
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert np.array_equal(np.concatenate(second), x.x[rows])


def test_stored_bytes_say_why_each_float_parameter_stays_float(tmp_path):
    import onnx
    import torch
    from onnx import numpy_helper

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize import ptq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 4)).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, torch.rand(1, 3, 8, 8), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    x = np.random.default_rng(0).normal(0, 1, (12, 3, 8, 8)).astype(np.float32)
    y = np.zeros(12, dtype=np.int64)
    data = Splits(x[:8], y[:8], x[8:10], y[8:10], x[10:], y[10:])
    pre = onnx.load(str(ptq.quantize(path, PTQQuantizeConfig(num_samples=8), data=data, out_dir=tmp_path / "p").model))
    second_conv = [n.name for n in pre.graph.node if n.op_type == "Conv"][1]
    res = ptq.quantize(path, PTQQuantizeConfig(num_samples=8, float_layers=[second_conv]), data=data,
                       out_dir=tmp_path / "q")
    stored = res.metrics["stored_bytes"]
    # the second conv's 16x8x3x3 weights stay float; the first conv's and the linear's are int8
    assert stored["float_layers"] == 16 * 8 * 3 * 3 * 4
    assert stored["int8"] == 8 * 3 * 3 * 3 + 4 * 256
    assert stored["zero_points"] >= 8 + 4  # one a weight channel, one an activation
    assert stored["biases"] == (8 + 16 + 4) * 4 and stored["scales"] >= (8 + 4) * 4 and stored["duplicate"] == 0
    g = onnx.load(str(res.model)).graph
    floats = sum(numpy_helper.to_array(t).nbytes for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert floats == sum(stored[k] for k in ("scales", "biases", "normalization", "elementwise", "float_layers",
                                             "other"))
