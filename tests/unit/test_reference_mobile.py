"""The second reference workload has the graph features the compression stages must handle."""

import torch
from torch import fx, nn

from compress_models import digits, trained, one_torch_thread  # noqa: F401  (autouse)
from edgeslim.components.reference.digits import top1
from edgeslim.components.reference.mobile import DigitsMobileNet, example_inputs
from tests.spread import measured


def test_forward_shape_and_example_inputs():
    m = DigitsMobileNet().eval()
    (x,) = example_inputs(3)
    assert x.shape == (3, 1, 8, 8)
    assert m(x).shape == (3, 10)
    assert DigitsMobileNet(width=0.5, num_classes=7).eval()(x).shape == (3, 7)


def test_has_depthwise_residual_and_one_concat():
    m = DigitsMobileNet()
    depthwise = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1
                 and c.groups == c.in_channels == c.out_channels]
    assert len(depthwise) >= 4
    residual = [b for b in m.modules() if getattr(b, "residual", False)]
    assert len(residual) == 2
    ops = [n.target for n in fx.symbolic_trace(m).graph.nodes if n.op == "call_function"]
    assert ops.count(torch.cat) == 1


def test_width_multiplier_shrinks_every_layer():
    small, big = DigitsMobileNet(width=0.5), DigitsMobileNet(width=1.0)
    assert sum(p.numel() for p in small.parameters()) < 0.4 * sum(p.numel() for p in big.parameters())


def test_learns_digits():
    d = digits()
    assert measured("reference.mobile_top1_test", top1(trained("mobile"), d.x_test, d.y_test)) > 70.0  # 88.3-93.6


def test_exports_with_add_and_concat(tmp_path):
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    import onnx

    res = export(trained("mobile"), OnnxExportConfig(check_samples=8), data=digits(),
                 out_path=tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(res.model)).graph.node]
    assert ops.count("Concat") >= 1 and ops.count("Add") >= 2
    assert res.metrics["max_abs_diff"] < 1e-3
