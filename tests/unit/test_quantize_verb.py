"""The one quantize verb: the method is the config's class."""

import pytest

from compress_models import digits, onnx_of, trained, one_torch_thread  # noqa: F401  (autouse)
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.stage_configs import (AccuracyAwareQuantizeConfig, PTQQuantizeConfig,
                                                      QATQuantizeConfig)
from edgeslim.components.quantize.apply import quantize
from edgeslim.components.quantize.ptq import check_qdq
from edgeslim.components.tasks.classification.search import ClassifierStrategy
from edgeslim.components.recipe import AccuracyGateConfig


def test_each_method_is_its_config_class(tmp_path):
    fp32 = onnx_of("cnn")
    ptq = quantize(fp32, PTQQuantizeConfig(num_samples=64), data=digits(), out_dir=tmp_path / "ptq")
    assert check_qdq(ptq.model)["zero_points_all_zero"] and ptq.lineage["quantize"]["method"] == "ptq"
    auto = quantize(fp32, AccuracyAwareQuantizeConfig(calibrators=["percentile"], num_samples=64), data=digits(),
                    out_dir=tmp_path / "auto", strategy=ClassifierStrategy(fp32, AccuracyGateConfig()))
    assert auto.metrics["winner"]["kind"] == "ptq" and auto.metrics["chosen_on"] == "val"
    qat = quantize(fp32, QATQuantizeConfig(num_samples=64, epochs=1), data=digits(), out_dir=tmp_path / "qat",
                   model=trained("cnn"))
    assert check_qdq(qat.model)["zero_points_all_zero"] and "fake_quant_top1_test" in qat.metrics


def test_a_method_without_what_it_needs_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="pass the model the ONNX was exported from"):
        quantize(onnx_of("cnn"), QATQuantizeConfig(), data=digits(), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="the task's strategy"):
        quantize(onnx_of("cnn"), AccuracyAwareQuantizeConfig(), data=digits(), out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
