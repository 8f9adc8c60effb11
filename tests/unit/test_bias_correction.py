"""Bias correction: an int8 layer's output keeps the fp32 layer's mean per channel on the calibration images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeslim.components.export import INPUT_NAME


def _model(path, op: str, rng) -> None:
    """A one-layer float model: a padded, strided, grouped Conv (4 -> 6 channels, 2 groups), or a Gemm
    (transB) on a flattened input, with weights coarse enough that int8 rounding leaves a mean shift."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if op == "Conv":
        w = rng.normal(0.3, 1.0, (6, 2, 3, 3)).astype(np.float32)
        w[:, :, 0, 0] *= 40  # one large tap per channel: the per-channel scale rounds the others coarsely
        node = helper.make_node("Conv", [INPUT_NAME, "w", "b"], ["y"], name="layer", pads=[1, 0, 1, 2],
                                strides=[2, 1], group=2)
        x_shape, y_shape = [None, 4, 9, 8], [None, 6, 5, 8]
    else:
        w = rng.normal(0.3, 1.0, (5, 12)).astype(np.float32)
        w[:, 0] *= 40
        node = helper.make_node("Gemm", [INPUT_NAME, "w", "b"], ["y"], name="layer", transB=1)
        x_shape, y_shape = [None, 12], [None, 5]
    b = rng.normal(0, 0.1, w.shape[0]).astype(np.float32)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _mean_error(fp32, int8, x) -> np.ndarray:
    """Per output channel, the int8 model's mean output minus fp32's over ``x``."""
    from edgeslim.components.common.onnx_runtime import make_session

    f, q = (make_session(p).run(None, {INPUT_NAME: x})[0] for p in (fp32, int8))
    axes = (0, 2, 3) if f.ndim == 4 else (0,)
    return (q - f).mean(axis=axes)


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_the_int8_layer_keeps_the_fp32_mean_of_each_output_channel(op, tmp_path):
    import onnx

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize

    rng = np.random.default_rng(0)
    fp32 = tmp_path / "fp32.onnx"
    _model(fp32, op, rng)
    shape = (32, 4, 9, 8) if op == "Conv" else (32, 12)
    x = (rng.random(shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)  # a mean far from 0
    none = np.zeros(len(x), np.int64)
    data = Splits(x, none, x[:4], none[:4], x[:4], none[:4])
    cfg = PTQQuantizeConfig(calibrator="minmax", num_samples=32, placement="weighted")
    ranges = calibrate_onnx(fp32, cfg, data)
    plain = quantize(fp32, cfg, data=data, out_dir=tmp_path / "plain", ranges=ranges)
    fixed = quantize(fp32, dataclasses.replace(cfg, bias_correction=True), data=data,
                     out_dir=tmp_path / "fixed", ranges=ranges)

    before, after = _mean_error(fp32, plain.model, x), _mean_error(fp32, fixed.model, x)
    assert np.abs(before).max() > 1e-3  # rounding did shift the mean
    # exact up to float32 sums: the correction is the shift measured on these very images
    assert np.abs(after).max() < 1e-3 * np.abs(before).max() + 1e-5
    assert fixed.metrics["bias_correction"]["layers"] == 1
    # only the bias moved: the int8 weights and every scale are the plain model's
    a, b = (onnx.load(str(r.model)).graph for r in (plain, fixed))
    same = {i.name: i.raw_data for i in a.initializer if i.name != "b"}
    assert same == {i.name: i.raw_data for i in b.initializer if i.name != "b"}
    assert "bias_correction" not in plain.metrics
