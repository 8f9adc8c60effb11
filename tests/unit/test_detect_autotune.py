"""The detector autotune's building blocks: head groups and calibration reused across trials."""

from __future__ import annotations

import pytest
import torch

from edgeslim.components.common.reference_detect import DigitsDetector, make_detection_splits


@pytest.fixture(scope="module")
def onnx_and_data(tmp_path_factory):
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    data = make_detection_splits(seed=0, n_train=16, n_val=4, n_test=4)
    torch.manual_seed(0)
    path = export(DigitsDetector(width=8, head_hidden=8).eval(), OnnxExportConfig(), data=data,
                  out_path=tmp_path_factory.mktemp("det") / "det.onnx").model
    return path, data


def test_calibration_runs_once_per_search_and_ranges_do_not_depend_on_float_layers(onnx_and_data, tmp_path):
    from edgeslim.components import quantize as q
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.detect_autotune import head_groups, reused_calibration

    path, data = onnx_and_data
    calls = []
    original = q.calibrate_ranges

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    q.calibrate_ranges = counting
    try:
        cfg = PTQQuantizeConfig(calibrator="minmax", num_samples=8)
        with reused_calibration():
            a = q.quantize(path, cfg, data=data, out_dir=tmp_path / "a")
            heads = head_groups(tmp_path / "a" / "model.pre.onnx")
            b = q.quantize(path, PTQQuantizeConfig(calibrator="minmax", num_samples=8,
                                                   float_layers=heads[1]["nodes"]), data=data, out_dir=tmp_path / "b")
        assert len(calls) == 1
        assert a.metrics["ranges"] == b.metrics["ranges"]
        assert set(heads[1]["nodes"]) <= set(b.metrics["float_layers"])
        q.quantize(path, cfg, data=data, out_dir=tmp_path / "c")  # outside the search: calibrates again
        assert len(calls) == 2
    finally:
        q.calibrate_ranges = original
    assert q.calibrate_ranges is original
