"""The calibrators choose different, sensible clipping ranges from the same histogram."""

from __future__ import annotations

import numpy as np

from edgeslim.components.quantize import calibrate


def _stats(x):
    (name_stats,) = calibrate.collect(lambda b: [b], ["t"], [x], 2048).values()
    return name_stats[:2]


def test_minmax_is_the_largest_magnitude():
    x = np.array([-3.0, 0.5, 2.0], dtype=np.float32)
    amax, hist = _stats(x)
    assert calibrate.choose_amax(amax, hist, "minmax") == 3.0


def test_clipping_calibrators_cut_a_rare_outlier():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [80.0]]).astype(np.float32)
    (amax, hist, top), = calibrate.collect(lambda b: [b], ["t"], [x], 2048).values()
    assert amax == 80.0 and amax <= top < amax * (1 + 1 / 2048)
    pct = calibrate.choose_amax(amax, hist, "percentile", 99.99, top=top)
    ent = calibrate.choose_amax(amax, hist, "entropy", top=top)
    mse = calibrate.choose_amax(amax, hist, "mse", top=top)
    for t in (pct, ent):
        assert 2.0 < t < 20.0  # the bulk (|x| up to ~4.5 sigma) is kept, the outlier is clipped
    # MSE weighs the lone outlier quadratically: it clips less, but still clips.
    assert pct < mse < amax
    assert calibrate.choose_amax(amax, hist, "percentile", 100.0, top=top) == amax  # the top bin: cut to amax


def test_percentile_grows_with_the_percentile():
    x = np.random.default_rng(1).exponential(1.0, 100_000).astype(np.float32)
    (amax, hist, top), = calibrate.collect(lambda b: [b], ["t"], [x], 2048).values()
    assert (calibrate.choose_amax(amax, hist, "percentile", 99.0, top=top)
            < calibrate.choose_amax(amax, hist, "percentile", 99.99, top=top))


def _grid_histogram(values, exp, n):
    """|x| > 0 counted in the bins ((j - 1) 2**exp, j 2**exp], j = 1..n, in float64 arithmetic."""
    a = np.abs(np.concatenate([np.ravel(v) for v in values]).astype(np.float64))
    a = a[np.isfinite(a) & (a > 0)]
    return np.bincount(np.ceil(a / 2.0 ** exp).astype(np.int64) - 1, minlength=n)[:n]


def test_one_pass_histogram_is_the_whole_datas_on_its_final_grid_whatever_the_batches():
    # The bins start from the first batch's range and widen (merging neighbours) as larger values arrive;
    # on a power-of-two grid that is exact: the counts are those of all the data binned at once.
    rng = np.random.default_rng(0)
    parts = [rng.normal(0, 0.01, 50_000), np.maximum(rng.normal(0, 1, 80_000), 0),  # ReLU: half zeros
             rng.standard_cauchy(70_000), rng.integers(-4, 5, 90_000) * 0.25,  # values on the bin edges
             rng.normal(0, 1e-3, 10_000)]
    for dtype in (np.float32, np.float64):
        batches = [p.astype(dtype) for p in parts]
        results = [calibrate.collect(lambda b: [b], ["t"], order, 2048)["t"]
                   for order in (batches, batches[::-1], [np.concatenate(batches)])]
        (amax, hist, top) = results[0]
        assert amax == max(float(np.abs(b).max()) for b in batches)
        assert 2048 < len(hist) <= 4096 and amax <= top < amax + top / len(hist)
        exp = int(np.log2(top / len(hist)))
        assert top == len(hist) * 2.0 ** exp
        assert np.array_equal(hist, _grid_histogram(batches, exp, len(hist)))
        for amax2, hist2, top2 in results[1:]:
            assert amax2 == amax and top2 == top and np.array_equal(hist2, hist)
    # NaN and infinite values are left out of the maximum and the histogram; the rest count.
    batches = [np.array([1.0, -2.0, 0.0], dtype=np.float32), np.array([np.nan, 5.0, -np.inf, -0.5], dtype=np.float32)]
    amax, hist, top = calibrate.collect(lambda b: [b], ["t"], batches, 16)["t"]
    assert amax == 5.0 and hist.sum() == 4


def test_calibration_reads_each_batch_once_and_minmax_bins_nothing():
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
        assert out[1][n][0] == out[4][n][0] and out[1][n][2] == out[4][n][2]
        assert np.array_equal(out[1][n][1], out[4][n][1])
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
    """Ranges from all calibration images run at once and binned at once on the final grid."""
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
        if amax == 0:
            out[n] = 0.0
            continue
        exp = int(np.ceil(np.log2(amax / (2 * cfg.num_bins))))  # the smallest power-of-two width ...
        while np.ceil(amax / 2.0 ** (exp - 1)) <= 2 * cfg.num_bins:
            exp -= 1
        while np.ceil(amax / 2.0 ** exp) > 2 * cfg.num_bins:  # ... whose 2 * num_bins bins reach amax
            exp += 1
        bins = int(np.ceil(amax / 2.0 ** exp))
        hist = _grid_histogram([outs[n]], exp, bins).astype(np.float64)
        out[n] = calibrate.choose_amax(amax, hist, cfg.calibrator, cfg.percentile, top=bins * 2.0 ** exp)
    return out


def test_calibration_ranges_are_all_images_binned_at_once_and_each_image_is_read_once(tmp_path, monkeypatch):
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
        # One pass: each calibration image read once (the first sizes the batches and is binned too).
        assert train.rows_read == 24
    # A budget smaller than one image's intermediate tensors: batches of one image, the same ranges.
    train = _CountedRows(x[:30])
    data = Splits(train, y[:30], x[30:35], y[30:35], x[35:], y[35:])
    cfg = PTQQuantizeConfig(calibrator="entropy", num_samples=24)
    monkeypatch.setattr(ptq, "CALIB_MEMORY", 1)
    assert ptq.calibrate_onnx(path, cfg, data) == _reference_ranges(path, data, cfg)
    assert train.rows_read == 24


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
