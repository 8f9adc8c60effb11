"""QAT: fake quantization that matches the exported Q/DQ ONNX, fine-tuned, same format as PTQ."""

import dataclasses

import onnx
import pytest
import torch

from compress_models import WORKLOADS, digits, same_state, state, trained, one_torch_thread  # noqa: F401  (autouse)
from edgeslim.components.common.errors import DataError
from edgeslim.components.common.stage_configs import QATQuantizeConfig
from edgeslim.components.tasks.classification.evaluate import sqnr_db
from edgeslim.components.export import run_onnx
from edgeslim.components.quantize.qat import fake_quant_model, qat
from edgeslim.components.quantize.ptq import check_qdq
from edgeslim.components.quantize.sensitivity import quantizable_layers
from tests.spread import measured


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for kind in WORKLOADS:
        model = trained(kind)
        before = state(model)
        out_dir = tmp_path_factory.mktemp(f"qat-{kind}")
        res = qat(model, QATQuantizeConfig(num_samples=128, epochs=1, lr=5e-4), data=digits(),
                  out_dir=out_dir)
        out[kind] = (res, same_state(before, state(model)), out_dir)
    return out


@pytest.mark.parametrize("kind", WORKLOADS)
def test_export_accuracy_matches_fake_quant_model(results, kind):
    res, _, _ = results[kind]
    m = res.metrics
    # 0.0 pt in every run of tests/spread.json; 0.5 pt is one test sample (0.28 pt) and a bit
    assert measured(f"qat.fake_quant_vs_onnx_top1_pt[{kind}]", abs(m["fake_quant_top1_test"] - m["onnx_top1_test"])) <= 0.5
    assert measured(f"qat.fake_quant_vs_onnx_pt[{kind}]", m["fake_quant_vs_onnx_pt"]) <= 0.5
    # the fake-quant model starts exactly where PTQ is: it is initialised from its calibration
    assert measured(f"qat.start_vs_ptq_top1_pt[{kind}]", abs(m["fake_quant_top1_test_start"] - m["ptq_top1_test"])) <= 0.5


@pytest.mark.parametrize("kind", WORKLOADS)
def test_same_qdq_format_as_ptq(results, kind):
    res, untouched, _ = results[kind]
    facts = check_qdq(res.model)
    assert facts["zero_points_all_zero"] and facts["qdq_nodes"] > 0
    convs = [n for n in onnx.load(str(res.model)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert facts["per_channel_weights"] >= len(convs)
    assert untouched, "qat changed its input model"
    assert res.lineage["calibration_split"] == "train"


@pytest.mark.parametrize("kind", WORKLOADS)
def test_fake_quant_twin_reproduces_the_onnx_outputs(results, kind):
    d, model = digits(), trained(kind)
    ptq_dir = results[kind][2] / "ptq"  # the PTQ model QAT started from
    fq = fake_quant_model(model, qdq_path=ptq_dir / "model.int8.onnx", fp32_path=ptq_dir / "model.pre.onnx",
                          x=d.x_train[:16])
    x = d.x_test[:128]
    with torch.no_grad():
        twin = fq(torch.from_numpy(x)).numpy()
        fp = model.eval()(torch.from_numpy(x)).numpy()
    qdq = run_onnx(ptq_dir / "model.int8.onnx", x)
    # the twin is far closer to the int8 ONNX than the fp32 model is
    # tests/spread.json: twin against Q/DQ 52.3 dB to exact (inf); 21.0 dB or more above the fp32 model's
    assert measured(f"qat.twin_sqnr_db[{kind}]", sqnr_db(qdq, twin)) > 45.0
    assert measured(f"qat.twin_top1_agreement[{kind}]", (twin.argmax(1) == qdq.argmax(1)).mean()) >= 0.99
    assert measured(f"qat.twin_vs_fp32_sqnr_gain_db[{kind}]", sqnr_db(qdq, twin) - sqnr_db(qdq, fp)) > 10.0


def test_float_layers_stay_float_in_both(results, tmp_path):
    d, model = digits(), trained("cnn")
    fp32 = results["cnn"][2] / "start.fp32.onnx"
    layers = quantizable_layers(results["cnn"][2] / "ptq" / "model.pre.onnx")
    first_conv = next(r["node"] for r in layers if r["layer"] == "features.0")
    res = qat(model, QATQuantizeConfig(num_samples=64, epochs=1, float_layers=[first_conv]), data=d,
              out_dir=tmp_path / "qat", fp32_onnx=fp32)
    g = onnx.load(str(res.model)).graph
    deq = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
    assert not any(i.startswith("features.0.weight") for i in deq)
    assert any(i.startswith("features.3.weight") for i in deq)
    assert measured("qat.float_layer_fake_quant_vs_onnx_pt", res.metrics["fake_quant_vs_onnx_pt"]) <= 0.5


def test_qat_without_training_data_is_refused(tmp_path):
    with pytest.raises(DataError, match="no training data"):
        qat(trained("cnn"), QATQuantizeConfig(), data=None, out_dir=tmp_path)
    d = dataclasses.replace(digits())
    d.x_train, d.y_train = d.x_train[:0], d.y_train[:0]
    with pytest.raises(DataError, match="train split"):
        qat(trained("cnn"), QATQuantizeConfig(), data=d, out_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written before the refusal"
