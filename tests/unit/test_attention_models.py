"""Attention models in seconds: a two-block timm ViT at 32x32 goes through pruning (heads kept whole),
export (folded weights named), PTQ (Q/DQ on the attention MatMuls, parameters float) and QAT (the
fake-quant twin of that graph). tests/integration/test_real_classifiers.py runs the real ones at 224."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.components.common.data import Splits

timm = pytest.importorskip("timm")


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                             patch_size=8, depth=2).eval()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)

    def part(n):
        return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, 4, n)

    (xt, yt), (xv, yv), (xs, ys) = part(16), part(8), part(8)
    return Splits(xt, yt, xv, yv, xs, ys, source="tiny-vit")


def test_pruning_keeps_heads_whole_and_prunes_the_embedding(data):
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.transform.prune import attention_inputs, prune

    model = tiny_vit()
    assert attention_inputs(model) == {f"blocks.{i}.attn": [f"blocks.{i}.attn.qkv"] for i in range(2)}
    res = prune(model, ChannelPruneConfig(keep_fraction=0.6, finetune_epochs=0), data=data)
    p = res.model
    assert res.metrics["macs_after"] <= 0.6 * res.metrics["macs_before"] * 1.02
    embed = p.patch_embed.proj.out_channels
    assert embed < 192 and p.cls_token.shape[-1] == p.pos_embed.shape[-1] == embed
    for blk in p.blocks:
        a = blk.attn
        assert (a.num_heads, a.head_dim, a.qkv.out_features, a.proj.in_features) == (3, 64, 576, 192)
        assert a.qkv.in_features == a.proj.out_features == embed
    assert p(torch.from_numpy(data.x_test)).shape == (8, 4)
    assert res.lineage["attention_inputs_kept"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert res.lineage["unwrapped_parameters"] == {"cls_token": 2, "pos_embed": 2}


def test_layer_ratio_on_an_attention_projection_is_refused_in_one_line(data):
    from edgeslim.components.common.errors import ConfigError
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.transform.prune import prune

    with pytest.raises(ConfigError, match=r"blocks.0.attn.qkv projects an attention's queries/keys/values"):
        prune(tiny_vit(), ChannelPruneConfig(layer_ratios={"blocks.0.attn.qkv": 0.3}, finetune_epochs=0), data=data)


def test_export_names_folded_linear_weights_and_ptq_quantizes_attention(data, tmp_path):
    import onnx

    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize

    model = tiny_vit()
    fp32 = export(model, OnnxExportConfig(check_samples=4), data=data, out_path=tmp_path / "vit.onnx").model
    g = onnx.load(str(fp32)).graph
    inits = {i.name for i in g.initializer}
    # a Linear on (B, N, C) is MatMul(x, W^T): W^T carries the parameter's name, not `val_87`
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"):
        assert name in inits
    weights = {n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}
    assert weights == {f"blocks.{b}.{m}.weight" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}

    for placement in ("all", "weighted"):
        res = quantize(fp32, PTQQuantizeConfig(num_samples=16, placement=placement), data=data,
                       out_dir=tmp_path / placement)
        q = onnx.load(str(res.model)).graph
        qinits = {i.name for i in q.initializer}
        producer = {o: n for n in q.node for o in n.output}
        attention = [n for n in q.node if n.op_type == "MatMul" and not any(
            producer.get(i) is not None and producer[i].input[0] in qinits for i in n.input)]
        assert len(attention) == 4  # q @ k^T and softmax @ v in both blocks
        for mm in attention:  # both inputs dequantized activations: TensorRT runs them in int8
            assert all(producer[i].op_type == "DequantizeLinear" for i in mm.input)
        # only conv/linear weights are int8; biases and LayerNorm parameters stay float
        int8 = {i.name.removesuffix("_quantized") for i in q.initializer if i.data_type == onnx.TensorProto.INT8}
        assert {w for w in int8 if w.endswith((".bias", "norm1.weight", "norm2.weight"))} == set()
        assert weights <= int8


def test_qat_twin_matches_the_attention_graph_and_trains(data, tmp_path):
    from edgeslim.components.common.stage_configs import QATQuantizeConfig
    from edgeslim.components.quantize.qat import qat

    res = qat(tiny_vit(), QATQuantizeConfig(num_samples=16, epochs=1, batch_size=8), data=data, out_dir=tmp_path)
    m = res.metrics
    assert m["qat_epochs"] == 1 and m["zero_points_all_zero"]
    # the twin computes what ONNX Runtime runs: attention, softmax and GELU quantized as in the graph
    assert m["fake_quant_vs_onnx_sqnr_db"] > 25.0


def test_search_goes_on_without_qat_when_the_model_cannot_be_traced(tmp_path):
    """A model torch.fx cannot trace: the accuracy-aware search skips QAT with one line and its refusal says why."""
    from torch import nn

    from edgeslim.components.common.errors import GateRejected
    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, OnnxExportConfig
    from edgeslim.components.export import export
    from edgeslim.components.tasks.classification.search import quantize_auto
    from edgeslim.components.recipe import AccuracyGateConfig

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            if x.shape[1] != 1:  # torch.export reads the fixed channel count; torch.fx cannot branch on it
                x = x.mean(1, keepdim=True)
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    data = Splits(x[:16], y[:16], x[16:20], y[16:20], x[20:], y[20:], source="untraceable")
    torch.manual_seed(0)
    model = Untraceable().eval()
    fp32 = export(model, OnnxExportConfig(check_samples=4), data=data, out_path=tmp_path / "b.onnx").model
    lines: list[str] = []
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=16, max_float_layers=0, qat=True, qat_epochs=1,
                                      placement="all")
    with pytest.raises(GateRejected) as exc:
        quantize_auto(model, fp32, cfg, data=data, parent_onnx_path=fp32, out_dir=tmp_path / "auto",
                      gate=AccuracyGateConfig(min_sqnr_db=500.0), progress=lines.append)
    assert any(line.startswith("QAT skipped: QAT needs a torch.fx-traceable model") for line in lines)
    msg = str(exc.value)
    assert "after 1 trial(s)" in msg and "QAT could not run (QAT needs a torch.fx-traceable model" in msg
    assert "\n" not in msg


def test_export_refuses_a_forward_that_fixes_the_batch_size(tmp_path):
    """len(x) in a forward makes the exporter fix the batch axis; the export says so in one line."""
    from torch import nn

    from edgeslim.components.common.errors import SourceError
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    class LenBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(len(x), -1))

    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    data = Splits(x, np.zeros(8, int), x, np.zeros(8, int), x, np.zeros(8, int), source="len")
    with pytest.raises(SourceError, match=r"ONNX export fixed the batch size at 2: .*len\(x\)"):
        export(LenBatch().eval(), OnnxExportConfig(check_samples=4), data=data, out_path=tmp_path / "m.onnx")
