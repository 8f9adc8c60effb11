"""Real classifier architectures at their real input size, 224x224x3, with random weights.

torchvision's ResNet-18, ResNet-50, MobileNetV3-Small and EfficientNet-B0 and timm's DeiT-Tiny and
ConvNeXt-Tiny go through the stages a recipe runs: structural pruning, ONNX export, PTQ, QAT and the
evaluate/gate step, each called as the pipeline's tasks call it, on a handful of synthetic 224x224
images read through the npz provider. The weights are random (nothing can be downloaded here), so
what is checked is mechanics a user would notice, not accuracy: the pruned network is smaller and
still maps an image to its 10 logits, attention keeps its heads, the int8 ONNX carries symmetric Q/DQ
on every conv/linear weight and on both inputs of the attention MatMuls, QAT trains and exports, and
the gate gives a verdict. BatchNorm statistics are taken from the images first: a random network's
default statistics shrink its logits to ~1e-17 (EfficientNet), and int8 of that says nothing.

One more test registers ResNet-18 in a real MLflow server as a user does and runs `edgeslim run`
with prune and the accuracy-aware quantizer (QAT allowed) on Kubeflow's local runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import register_champion, run_cli
from tests.spread import measured

pytestmark = pytest.mark.slow

NUM_CLASSES = 10
SIZE = 224
# name -> (library, constructor, heavy). The heavy ones prune without fine-tuning and train QAT on half the
# images, to keep the module short. EfficientNet is among them for a second reason: once its fine-tune
# re-estimates the BatchNorm statistics of the pruned random network, its activations grow 20-sigma
# tails (std 1, |x| up to 29) and int8 of every tensor keeps 0.5-5 dB, which says nothing about int8.
ARCHS = {
    "resnet18": ("torchvision", "resnet18", False),
    "resnet50": ("torchvision", "resnet50", True),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", False),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", True),
    "deit_tiny": ("timm", "deit_tiny_patch16_224", False),
    "convnext_tiny": ("timm", "convnext_tiny", True),
}


def synthetic_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` smooth random RGB images, ImageNet-normalised (N, 3, 224, 224) float32: random 7x7 colour
    fields upsampled, so neighbouring pixels correlate as in photographs."""
    import torch

    coarse = torch.from_numpy(rng.uniform(0.0, 1.0, (n, 3, 7, 7)).astype(np.float32))
    img = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((img.clamp(0, 1) - mean) / std).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def images_npz(tmp_path_factory) -> Path:
    """8 train, 4 validation and 4 test images of 10 classes, as the npz provider reads them."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("real-classifiers") / "images224.npz"
    splits = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        splits[f"x_{split}"] = synthetic_images(n, rng)
        splits[f"y_{split}"] = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    np.savez(path, **splits)
    return path


@pytest.fixture(scope="module")
def data(images_npz):
    from edgeslim.components.common.data import load_data

    return load_data("npz", {"path": str(images_npz)})


def build(arch: str, x: np.ndarray):
    """The architecture with random weights (seed 0) and BatchNorm statistics of ``x``, in eval mode."""
    import torch
    from torch import nn

    lib, name, _ = ARCHS[arch]
    torch.manual_seed(0)
    if lib == "torchvision":
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batch
        with torch.no_grad():
            model.train()(torch.from_numpy(x))
        for m in norms:
            m.momentum = 0.1
    return model.eval()


def last_linear(model):
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def check_structure(arch: str, model, pruned) -> None:
    """What pruning must keep consistent in each family, beyond "it still runs"."""
    from torch import nn

    if arch in ("mobilenet_v3_small", "efficientnet_b0"):
        from torchvision.ops import SqueezeExcitation

        dw = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw), "depthwise convs stay depthwise"
        se = [m for m in pruned.modules() if isinstance(m, SqueezeExcitation)]
        assert se and all(m.fc1.in_channels == m.fc2.out_channels for m in se), "squeeze-excitation scales its input"
    if arch == "deit_tiny":
        embed0 = model.patch_embed.proj.out_channels
        embed = pruned.patch_embed.proj.out_channels
        assert embed < embed0, "the embedding width is pruned"
        assert pruned.cls_token.shape[-1] == pruned.pos_embed.shape[-1] == embed
        for blk0, blk in zip(model.blocks, pruned.blocks):
            a0, a = blk0.attn, blk.attn
            # heads kept whole: same heads, same head width, so the forward's reshape holds
            assert (a.num_heads, a.head_dim) == (a0.num_heads, a0.head_dim)
            assert a.qkv.out_features == 3 * a.num_heads * a.head_dim == a0.qkv.out_features
            assert a.proj.in_features == a.num_heads * a.head_dim
            assert a.qkv.in_features == a.proj.out_features == blk.norm1.normalized_shape[0] == embed
            assert blk.mlp.fc1.out_features <= blk0.mlp.fc1.out_features
    if arch == "convnext_tiny":
        for stage in pruned.stages:
            for blk in stage.blocks:
                c = blk.conv_dw.out_channels
                # channels-last LayerNorm and the layer-scale gamma (a bare parameter) follow the channels
                assert blk.norm.normalized_shape[0] == blk.gamma.shape[0] == blk.mlp.fc2.out_features == c
                assert blk.mlp.fc1.in_features == c
        assert sum(b.conv_dw.out_channels for s in pruned.stages for b in s.blocks) < \
            sum(b.conv_dw.out_channels for s in model.stages for b in s.blocks)


def weight_quantization(path) -> dict:
    """Per weighted op of a Q/DQ ONNX: is its weight int8 with per-channel scales, and (MatMuls of two
    activations: attention) are both inputs dequantized?"""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def dq(name):
        n = producer.get(name)
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    weighted, int8_weights, attention, attention_qdq = 0, 0, 0, 0
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = dq(n.input[1])
        if w is not None and w.input[0] in inits:
            weighted += 1
            scale = inits.get(w.input[1])
            if inits[w.input[0]].data_type == onnx.TensorProto.INT8 and scale is not None and len(scale.dims) == 1:
                int8_weights += 1
        elif n.op_type == "MatMul" and n.input[1] not in inits:
            attention += 1
            attention_qdq += all(dq(i) is not None and dq(i).input[0] not in inits for i in n.input[:2])
        else:
            weighted += 1  # a weighted op left without int8 weights
    return {"weighted": weighted, "int8_weights": int8_weights, "attention": attention,
            "attention_qdq": attention_qdq}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_real_classifier_prunes_exports_quantizes_and_gates_at_224(arch, data, tmp_path):
    import onnx
    import torch

    from edgeslim.components.common.onnx_runtime import make_session, sqnr_db
    from edgeslim.components.common.stage_configs import ChannelPruneConfig, OnnxExportConfig, QATQuantizeConfig
    from edgeslim.components.tasks.classification.evaluate import evaluate, gate
    from edgeslim.components.export import export, run_onnx
    from edgeslim.components.quantize.apply import quantize
    from edgeslim.components.quantize.ptq import check_qdq
    from edgeslim.components.recipe import AccuracyGateConfig, EvaluateConfig
    from edgeslim.components.transform.prune import count_macs_params, prune

    heavy = ARCHS[arch][2]
    model = build(arch, data.x_train)
    x1 = torch.from_numpy(data.x_test[:1])
    assert model(x1).shape == (1, NUM_CLASSES)

    # prune: 60% of the MACs kept, distilled fine-tuning from the unpruned network
    res = prune(model, ChannelPruneConfig(keep_fraction=0.6, finetune_epochs=0 if heavy else 1, batch_size=4),
                data=data)
    m, pruned = res.metrics, res.model
    assert m["macs_after"] <= 0.6 * m["macs_before"] * 1.02 and m["macs_after"] >= 0.4 * m["macs_before"]
    assert m["params_after"] < m["params_before"]
    assert (m["macs_after"], m["params_after"]) == count_macs_params(pruned, x1)
    assert count_macs_params(model, x1)[0] == m["macs_before"], "prune changed its input model"
    with torch.no_grad():
        assert pruned.eval()(torch.from_numpy(data.x_test[:2])).shape == (2, NUM_CLASSES)
    assert last_linear(pruned).out_features == NUM_CLASSES
    check_structure(arch, model, pruned)
    if arch == "deit_tiny":
        assert len(res.lineage["attention_inputs_kept"]) == len(model.blocks)
        assert set(res.lineage["unwrapped_parameters"]) == {"cls_token", "pos_embed"}
    if arch == "convnext_tiny":
        assert len(res.lineage["unwrapped_parameters"]) == sum(len(s.blocks) for s in model.stages)

    # export: opset 18, a batch axis of any size, the same logits as torch
    export_cfg = OnnxExportConfig(check_samples=4)
    fp32 = export(pruned, export_cfg, data=data, out_path=tmp_path / "pruned.fp32.onnx").model
    assert {o.domain: o.version for o in onnx.load(str(fp32)).opset_import}[""] == 18
    sess = make_session(fp32)
    for n in (1, 3):
        assert sess.run(None, {"input": np.repeat(data.x_test[:1], n, axis=0)})[0].shape == (n, NUM_CLASSES)
    ref = run_onnx(fp32, data.x_test)

    # QAT starts from PTQ (the same call a `method: ptq` recipe makes, written to qat/ptq/), builds the
    # fake-quant twin of that Q/DQ graph, trains it one epoch, exports and quantizes it again
    qat_data = data if not heavy else type(data)(x_train=data.x_train[:4], y_train=data.y_train[:4],
                                                  x_val=data.x_val, y_val=data.y_val, x_test=data.x_test,
                                                  y_test=data.y_test, source=data.source)
    qat = quantize(fp32, QATQuantizeConfig(num_samples=8, epochs=1, batch_size=4), data=qat_data,
                   out_dir=tmp_path / "qat", model=pruned, export_config=export_cfg)
    ptq_int8 = tmp_path / "qat" / "ptq" / "model.int8.onnx"

    # PTQ: symmetric int8, per-channel weights on every conv/linear, attention MatMuls quantized on both inputs
    facts = check_qdq(ptq_int8)
    assert facts["zero_points_all_zero"] and facts["per_channel_weights"] > 0
    wq = weight_quantization(ptq_int8)
    assert wq["weighted"] > 0 and wq["int8_weights"] == wq["weighted"], wq
    if arch == "deit_tiny":
        assert wq["attention"] == 2 * len(model.blocks), wq
        assert qat.metrics["float_parameter_nodes"] > 0  # biases and LayerNorm parameters stay float
    assert wq["attention_qdq"] == wq["attention"], wq
    ptq_sqnr = sqnr_db(ref, run_onnx(ptq_int8, data.x_test))
    # int8 computes the same function, not noise (5 dB: the noise under a third of the signal's power).
    # Random weights with Q/DQ on every op are a hard case: 15.1 (DeiT) to 32.7 dB (EfficientNet) here.
    assert measured(f"real.{arch}.ptq_sqnr_db", ptq_sqnr) > 5.0

    assert qat.metrics["qat_epochs"] == 1 and qat.metrics["zero_points_all_zero"]
    assert (tmp_path / "qat" / "qat.fp32.onnx").is_file()
    qwq = weight_quantization(qat.model)
    assert qwq["int8_weights"] == qwq["weighted"] == wq["weighted"] and qwq["attention_qdq"] == wq["attention"]
    # the twin trained is the graph ONNX Runtime runs (20 dB: within a tenth of the output's amplitude;
    # 30.8-42.7 dB here)
    assert measured(f"real.{arch}.fake_quant_vs_onnx_sqnr_db", qat.metrics["fake_quant_vs_onnx_sqnr_db"]) > 20.0

    # evaluate and gate: int8 against its own fp32 model, the verdict a user reads
    ev_cfg = EvaluateConfig(latency_warmup=0, latency_repeats=1, latency_batches=[1])
    ev = evaluate(qat.model, ev_cfg, parent_onnx=fp32, data=data, student_onnx=tmp_path / "qat" / "qat.fp32.onnx")
    fid = ev.metrics["candidate"]["fidelity"]
    assert 0.0 <= fid["top1_agreement"] <= 1.0 and np.isfinite(fid["quantization_sqnr_db"])
    assert measured(f"real.{arch}.qat_quantization_sqnr_db", fid["quantization_sqnr_db"]) > 5.0  # 17.9-37.6 dB here
    verdict = gate(ev.metrics, AccuracyGateConfig())
    assert isinstance(verdict["passed"], bool) and verdict["summary"]
    assert {c["name"] for c in verdict["checks"]} == {"metric_drop", "top1_agreement", "sqnr_db"}
    assert ev.metrics["candidate"]["size_bytes"] < 0.5 * ev.metrics["source"]["size_bytes"]


def test_registered_resnet18_runs_through_edgeslim_run_with_prune_and_auto_qat(
        mlflow_server, images_npz, data, tmp_path):
    """ResNet-18 registered as a user does, then `edgeslim run` on Kubeflow's local runner: pull, prune,
    export, the accuracy-aware quantizer (PTQ in both placements, then QAT), evaluate and gate, every task a process of
    its own that loads the torchvision model from what the previous one wrote. The gate asks for an
    int8 SQNR no int8 model reaches, so the search goes on to QAT, and the run ends with the gate's
    one-line refusal naming its best trial."""
    from mlflow import MlflowClient

    from edgeslim.components.common.errors import GateRejected

    model = build("resnet18", data.x_train)
    register_champion(mlflow_server.uri, model, "real-resnet18", "tests-real-classifiers")

    recipe = {
        "source": "models:/real-resnet18@champion",
        "data": {"provider": "npz", "args": {"path": str(images_npz)}},
        "stages": [
            {"prune": {"method": "channel", "keep_fraction": 0.7, "finetune_epochs": 1, "batch_size": 4}},
            {"quantize": {"method": "auto", "calibrators": ["percentile"], "num_samples": 8,
                          "max_float_layers": 0, "qat": True, "qat_epochs": 1}},
        ],
        "gate": {"max_metric_drop": 100.0, "min_top1_agreement": 0.0, "min_sqnr_db": 200.0},
        "evaluate": {"latency_warmup": 0, "latency_repeats": 1, "latency_batches": [1]},
        "register": {"alias": "edge-candidate", "experiment": "tests-real-classifiers"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = run_cli("run", str(tmp_path / "recipe.yaml"), "--tracking-uri", mlflow_server.uri,
                   "--workdir", str(tmp_path / "out"), timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == GateRejected.exit_code, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert "no candidate passed the gate after 3 trial(s)" in out, out[-2000:]

    tuned = list((tmp_path / "out").rglob("autotune.json"))
    assert tuned, "the quantize task wrote no autotune.json"
    trials = json.loads(tuned[0].read_text())["trials"]
    # placement auto (the default): PTQ with Q/DQ on every op, then on the weighted layers' inputs, then QAT
    assert [(t["kind"], t["placement"]) for t in trials][:2] == [("ptq", "all"), ("ptq", "weighted")]
    assert [t["kind"] for t in trials] == ["ptq", "ptq", "qat"]
    assert all(np.isfinite(t["sqnr_db"]) and not t["passed"] for t in trials)
    assert "fake_quant_top1_test" in trials[2]
    # the pruned ResNet-18 is what the quantize task got
    pruned = json.loads(next((tmp_path / "out").rglob("transform-op/info")).read_text())
    assert pruned["macs_after"] <= 0.7 * pruned["macs_before"] * 1.02 and pruned["params_after"] < pruned["params_before"]
    assert not MlflowClient(mlflow_server.uri).search_model_versions("name='real-resnet18-edge'")
