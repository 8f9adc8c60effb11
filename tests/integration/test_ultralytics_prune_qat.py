"""Ultralytics YOLOv8n (random init, nc=3) through prune and QAT: structural pruning to ~70% of the MACs
(C2f blocks split-free, the head's output convs and DFL kept whole) with one fine-tuning epoch on the
labels with Ultralytics' own v8DetectionLoss, distilled from the unpruned model's raw outputs; the pruned
model keeps its decoded (N, 4+nc, A) output, exports, and goes through PTQ, evaluate and the gate; QAT of it exports a Q/DQ ONNX with the
same output that evaluate runs on. The steps run at 192x192 (YOLOv8n's real size is 640; the structure
and the code paths are the same, the anchors 756 instead of 8400) on a handful of synthetic images to keep
the tests near three minutes on a shared two-core machine."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.integration.test_ultralytics_detectors import _images

pytestmark = pytest.mark.slow
os.environ.setdefault("YOLO_OFFLINE", "1")
NC = 3
SIZE = 192
ANCHORS = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2


@pytest.fixture(scope="module")
def data():
    from edgeslim.components.common.data import Splits

    arrays = {}
    for split, n, seed in (("train", 6, 0), ("val", 3, 1), ("test", 3, 2)):
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _images(n, seed, SIZE)
    return Splits(**arrays, source="synthetic")


@pytest.fixture(scope="module")
def task():
    from edgeslim.components.common.tasks import task_from_dict

    # Random-init scores sit near 0.003: keep every candidate so that the decoder has boxes to compare.
    return task_from_dict({"kind": "detection", "num_classes": NC,
                           "decoder": {"format": "yolo-decoded", "strides": [8, 16, 32], "min_score": 0.0}})


@pytest.fixture(scope="module")
def pruned(data):
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.tasks.detection.train import prune_detector

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=NC, verbose=False).eval()
    cfg = ChannelPruneConfig(keep_fraction=0.7, finetune_epochs=1, batch_size=3, lr=1e-3)
    return model, prune_detector(model, cfg, data=data)


@pytest.fixture(scope="module")
def exported(pruned, data, tmp_path_factory):
    """The fp32 ONNX of the unpruned parent and of the pruned model."""
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    model, res = pruned
    out = tmp_path_factory.mktemp("exported")
    return (export(model, OnnxExportConfig(check_samples=3), data=data, out_path=out / "parent.onnx"),
            export(res.model, OnnxExportConfig(check_samples=3), data=data, out_path=out / "pruned.onnx"))


def _head_convs(model) -> dict[str, int]:
    import torch

    detect = model.model[-1]
    return {n: m.out_channels for n, m in detect.named_modules() if isinstance(m, torch.nn.Conv2d)
            and (n.endswith(".2") or n == "dfl.conv")}


def test_a_pruned_ultralytics_detector_keeps_its_decoded_output_and_goes_through_ptq_and_the_gate(
        pruned, exported, data, task, tmp_path):
    import onnx
    import torch

    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import check_qdq, quantize
    from edgeslim.components.recipe import EvaluateConfig
    from edgeslim.components.tasks.detection.evaluate import evaluate_detection, gate_detection

    model, res = pruned
    m = res.metrics
    assert m["macs_after"] < m["macs_before"] and m["params_after"] < m["params_before"]
    assert m["macs_after"] / m["macs_before"] == pytest.approx(0.7, abs=0.05)
    # the head's output convs and the DFL integral keep their channels; the blocks with a split were rewritten
    assert _head_convs(res.model) == _head_convs(model)
    assert len(_head_convs(model)) == 7 and set(m["heads_kept"]) == {f"model.22.{n}" for n in _head_convs(model)}
    assert torch.equal(res.model.model[-1].dfl.conv.weight, model.model[-1].dfl.conv.weight)
    assert res.lineage["split_free_blocks"] and res.lineage["finetune_loss"] == m["finetune_loss_kind"]
    assert m["finetune_loss_kind"].startswith("ultralytics v8DetectionLoss (labels) with output distillation")
    assert np.isfinite(m["finetune_loss"])
    assert np.isfinite(m["output_sqnr_db_val"])  # random weights: its value says little, it is reported
    assert all(p.requires_grad for n, p in model.named_parameters() if "dfl" not in n)  # the parent is untouched
    assert not model.model[-1].dfl.conv.weight.requires_grad

    x = torch.from_numpy(data.x_val)
    with torch.no_grad():
        out, ref = res.model(x), model(x)
    assert out[0].shape == ref[0].shape == (len(x), 4 + NC, ANCHORS)

    parent, fp32 = exported
    (output,) = onnx.load(str(fp32.model)).graph.output
    dims = [d.dim_value or d.dim_param for d in output.type.tensor_type.shape.dim]
    assert dims[1:] == [4 + NC, ANCHORS] and isinstance(dims[0], str)
    assert fp32.metrics["size_bytes"] < parent.metrics["size_bytes"]

    int8 = quantize(fp32.model, PTQQuantizeConfig(calibrator="minmax", placement="weighted", num_samples=4),
                    data=data, out_dir=tmp_path / "int8").model
    assert check_qdq(int8)["qdq_nodes"] > 0
    ev = evaluate_detection(int8, EvaluateConfig(latency_batches=[1], latency_warmup=1, latency_repeats=2),
                            parent_onnx=parent.model, data=data, task=task)
    assert {"map50", "map50_95"} <= set(ev.metrics["candidate"]["detection"])
    verdict = gate_detection(ev.metrics, task.gate)
    assert {c["name"] for c in verdict["checks"]} >= {"map50_95_drop"} and isinstance(verdict["passed"], bool)
    print(f"\nYOLOv8n@{SIZE} pruned: MACs {m['macs_before'] / 1e9:.3f}G -> {m['macs_after'] / 1e9:.3f}G, params "
          f"{m['params_before'] / 1e6:.3f}M -> {m['params_after'] / 1e6:.3f}M, ONNX {parent.metrics['size_bytes']} -> "
          f"{fp32.metrics['size_bytes']} B, int8 {os.path.getsize(int8)} B, output SQNR vs unpruned (val) "
          f"{res.metrics['steps'][-1]}")


def test_qat_of_a_pruned_ultralytics_detector_exports_the_same_decoded_output(pruned, exported, data, task,
                                                                             tmp_path):
    import onnx

    from edgeslim.components.common.stage_configs import QATQuantizeConfig
    from edgeslim.components.tasks.detection.qat import qat_detector
    from edgeslim.components.quantize.ptq import check_qdq
    from edgeslim.components.recipe import EvaluateConfig
    from edgeslim.components.tasks.detection.evaluate import evaluate_detection

    _, res = pruned
    cfg = QATQuantizeConfig(calibrator="minmax", num_samples=4, epochs=1, lr=1e-5, batch_size=4)
    qat = qat_detector(res.model, cfg, data=data, out_dir=tmp_path / "qat")
    (output,) = onnx.load(str(qat.model)).graph.output
    assert [d.dim_value or d.dim_param for d in output.type.tensor_type.shape.dim][1:] == [4 + NC, ANCHORS]
    facts = check_qdq(qat.model)
    assert facts["qdq_nodes"] > 0 and facts["per_channel_weights"] > 0 and facts["zero_points_all_zero"]
    err = qat.metrics["output_error_val"]
    assert all(np.isfinite(v) for v in err.values()) and qat.lineage["method"] == "qat"
    ev = evaluate_detection(qat.model, EvaluateConfig(latency_batches=[1], latency_warmup=1, latency_repeats=2),
                            parent_onnx=exported[1].model, data=data, task=task)
    assert {"map50", "map50_95"} <= set(ev.metrics["candidate"]["detection"])
    print(f"\nQAT of the pruned YOLOv8n@{SIZE}: Q/DQ ONNX {qat.metrics['size_bytes']} B, output error (val) {err}")
