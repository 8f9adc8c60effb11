"""Calibrators, quantize methods, stage configs and data providers are found by name in their entry-point
groups, edgeslim's own included: an unknown name is one line with the closest known one, and one that
another package registers is taken like a built-in."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.config import STAGES, stage_config_class
from edgeslim.components.common.data import PROVIDERS, provider_class
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.stage_configs import (CALIBRATORS, AccuracyAwareQuantizeConfig, ChannelPruneConfig,
                                                      LogitDistillConfig, OnnxExportConfig, PTQQuantizeConfig,
                                                      QATQuantizeConfig)
from edgeslim.components.quantize import calibrate
from edgeslim.components.quantize.apply import QUANTIZE_METHODS, quantize
from edgeslim.components.recipe import recipe_from_dict


def _one_line(exc_info, *needles: str) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_the_built_ins_are_entry_points():
    assert CALIBRATORS.names() == ["entropy", "minmax", "mse", "percentile"]
    assert QUANTIZE_METHODS.names() == ["auto", "ptq", "qat"]
    assert {"sklearn-digits", "npz", "digits-detect", "imagefolder", "yolo", "coco"} <= set(PROVIDERS.names())
    assert STAGES.get("quantize.auto") is AccuracyAwareQuantizeConfig


def test_a_stage_without_a_method_gets_its_default():
    defaults = {s: stage_config_class(s, None, "") for s in ("export", "distill", "prune", "quantize")}
    assert defaults == {"export": OnnxExportConfig, "distill": LogitDistillConfig, "prune": ChannelPruneConfig,
                        "quantize": PTQQuantizeConfig}
    assert stage_config_class("quantize", "qat", "") is QATQuantizeConfig


def test_an_unknown_stage_or_method_is_one_line_naming_the_closest():
    with pytest.raises(ConfigError) as err:
        stage_config_class("quantize", "qta", "stages[2].")
    _one_line(err, "stages[2].quantize.method: unknown method 'qta'; did you mean 'qat'?")
    with pytest.raises(ConfigError) as err:
        stage_config_class("quantise", None, "stages[2].")
    _one_line(err, "stages[2].quantise: unknown key; did you mean 'quantize'?")


def test_an_unknown_calibrator_is_one_line_naming_the_closest():
    with pytest.raises(ConfigError) as err:
        PTQQuantizeConfig.from_dict({"calibrator": "percentil"}, "stages[1].quantize")
    _one_line(err, "stages[1].quantize.calibrator: unknown calibrator 'percentil'; did you mean 'percentile'?",
              "known: entropy, minmax, mse, percentile", "edgeslim.calibrators")
    with pytest.raises(ConfigError) as err:
        QATQuantizeConfig(calibrator="mes")
    _one_line(err, "quantize.calibrator: unknown calibrator 'mes'; did you mean 'mse'?")
    with pytest.raises(ConfigError) as err:
        AccuracyAwareQuantizeConfig(calibrators=["entropy", "entrop"])
    _one_line(err, "quantize.calibrators[1]: unknown calibrator 'entrop'; did you mean 'entropy'?")
    with pytest.raises(ConfigError) as err:
        calibrate.choose_amax(1.0, np.ones(2048), "minmix")
    _one_line(err, "unknown calibrator 'minmix'; did you mean 'minmax'?")


def test_an_unknown_provider_is_one_line_naming_the_closest():
    with pytest.raises(ConfigError) as err:
        provider_class("imagefoldr")
    _one_line(err, "data.provider: unknown provider 'imagefoldr'; did you mean 'imagefolder'?", "digits-detect")


@pytest.fixture
def half_amax():
    """A calibrator another package registers: half the largest |x|."""
    def half(amax: float, hist: np.ndarray, *, percentile: float) -> float:
        return amax / 2

    CALIBRATORS.register("half", half)
    yield half
    CALIBRATORS.unregister("half")


def test_a_registered_calibrator_is_taken_by_the_configs_and_used(half_amax):
    raw = {"source": "models:/m@champion", "stages": [{"quantize": {"method": "ptq", "calibrator": "half"}}]}
    assert recipe_from_dict(raw).quantize.calibrator == "half"
    assert QATQuantizeConfig.from_dict({"calibrator": "half"}).ptq().calibrator == "half"
    auto = AccuracyAwareQuantizeConfig.from_dict({"calibrators": ["half", "minmax"]})
    assert auto.ptq("half").calibrator == "half" and auto.qat_config("half", []).calibrator == "half"
    assert calibrate.choose_amax(3.0, np.ones(2048), "half") == 1.5
    with pytest.raises(ConfigError) as err:
        PTQQuantizeConfig(calibrator="halve")
    _one_line(err, "did you mean 'half'?")


class _FakePTQ:
    """A quantize config of a method another package registers."""

    stage, method = "quantize", "ptq-fake"


def test_quantize_dispatches_by_the_configs_method(tmp_path):
    calls = []

    def fake(fp32_onnx, config, **kw):
        calls.append((fp32_onnx, config.method, sorted(kw)))
        return "result"

    QUANTIZE_METHODS.register("ptq-fake", fake)
    try:
        assert quantize("m.onnx", _FakePTQ(), data=None, out_dir=tmp_path) == "result"
    finally:
        QUANTIZE_METHODS.unregister("ptq-fake")
    assert calls == [("m.onnx", "ptq-fake", ["data", "export_config", "model", "out_dir", "parent_run_id",
                                             "progress", "strategy", "tracking_uri"])]
    with pytest.raises(ConfigError) as err:
        quantize("m.onnx", OnnxExportConfig(), data=None, out_dir=tmp_path)
    _one_line(err, "quantize: method 'onnx' is not a quantize method; use auto, ptq, qat")
