"""The reference detector's structure, its training, export, int8 and pruning (tiny and fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.components.reference.detector import (
    C2f, DigitsDetector, build_targets, default_heads, make_detection_splits, train_detector,
)
from edgeslim.components.common.tasks import task_from_dict
from tests.spread import SEED, measured


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions on a shared 2-core machine: one thread avoids OpenMP oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return make_detection_splits(seed=0, n_train=96, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def task():
    return task_from_dict({"kind": "detection", "num_classes": 10, "decoder": {"heads": default_heads()}})


@pytest.fixture(scope="module")
def tiny(data):
    torch.manual_seed(SEED)
    return train_detector(DigitsDetector(width=8, head_hidden=8), data.x_train, data.y_train, epochs=1,
                          batch_size=32)


def test_the_detector_is_yolov8_shaped(tiny):
    mods = list(tiny.modules())
    assert any(isinstance(m, C2f) for m in mods) and any(isinstance(m, nn.SiLU) for m in mods)
    assert any(isinstance(m, nn.Upsample) for m in mods)
    with torch.no_grad():
        out = tiny(torch.rand(2, 1, 48, 48))
    assert [tuple(o.shape) for o in out] == [(2, 4, 12, 12), (2, 10, 12, 12), (2, 4, 6, 6), (2, 10, 6, 6),
                                            (2, 4, 3, 3), (2, 10, 3, 3)]
    for scores in out[1::2]:  # class scores end in a sigmoid
        assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0


def test_targets_put_each_box_on_cells_near_its_centre(data):
    labels = [np.array([[10, 10, 20, 22, 3]], np.float32)]
    lvl4, lvl8, lvl16 = build_targets(labels, 48, 10, (4, 8, 16))
    assert lvl4["pos"][0, 16 // 4, 15 // 4] and lvl4["cls"][0, 3, 4, 3] == 1.0
    assert not lvl16["pos"].any()  # a 12 px box is too small for stride 16
    gy, gx = np.nonzero(lvl4["pos"][0])
    l, t, r, b = lvl4["box"][0, :, gy[0], gx[0]] * 4
    cx, cy = (gx[0] + 0.5) * 4, (gy[0] + 0.5) * 4
    assert (cx - l, cy - t, cx + r, cy + b) == pytest.approx((10, 10, 20, 22))


def test_training_lowers_the_detection_loss(data):
    torch.manual_seed(0)
    losses = []
    train_detector(DigitsDetector(width=8, head_hidden=8), data.x_train[:64], data.y_train[:64], epochs=2,
                   batch_size=32,
                   progress=lambda e, n, l: losses.append(l))
    assert len(losses) == 2 and losses[1] < losses[0]


def test_export_and_int8_keep_the_head_outputs(tiny, data, task, tmp_path):
    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.tasks.detection.search import head_groups
    from edgeslim.components.tasks.detection.evaluate import onnx_detections
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize

    res = export(tiny, OnnxExportConfig(), data=data, out_path=tmp_path / "det.onnx")
    groups = head_groups(res.model)
    assert [g["output"] for g in groups] == [f"output_{i}" for i in range(6)]
    for g in groups[1::2]:  # class outputs come through a Sigmoid from their conv
        assert len(g["nodes"]) == 2
    q = quantize(res.model, PTQQuantizeConfig(calibrator="minmax", num_samples=32), data=data,
                 out_dir=tmp_path / "q")
    assert q.metrics["zero_points_all_zero"] and q.metrics["per_channel_weights"] > 0
    assert all(f"output_{i}" in q.metrics["ranges"] for i in range(6))  # the report shows each head's range
    dets, outs, names = onnx_detections(q.model, data.x_test, task)
    assert names == [f"output_{i}" for i in range(6)] and len(dets) == len(data.x_test)


def test_pruning_keeps_heads_whole_and_halves_the_macs(tiny, data):
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.tasks.detection.train import head_layers, prune_detector

    example = torch.from_numpy(data.x_train[:1])
    heads = head_layers(tiny, example)
    assert sorted(heads) == sorted(f"head.{i}.{b}.1" for i in range(3) for b in ("box", "cls"))
    res = prune_detector(tiny, ChannelPruneConfig(keep_fraction=0.45, finetune_epochs=1, batch_size=32),
                         data=data, feature_layers=["fpn4", "pan8", "pan16"])
    assert res.metrics["macs_ratio"] >= 2.0
    before = [tuple(o.shape) for o in tiny(example)]
    after = [tuple(o.shape) for o in res.model(example)]
    assert before == after
    assert tiny.head[0].cls[1].out_channels == res.model.head[0].cls[1].out_channels == 10
    # The C2f concat still lines up: a forward pass through every block works in eval and train mode.
    res.model.train()(torch.rand(2, 1, 48, 48))


def test_pruning_a_detector_in_steps_gets_there_gradually(tiny, data):
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.tasks.detection.train import prune_detector

    seen = []
    res = prune_detector(tiny, ChannelPruneConfig(keep_fraction=0.45, steps=2, finetune_epochs=1, batch_size=32),
                         data=data, feature_layers=["fpn4"], progress=lambda e, n, l: seen.append((e, n)))
    steps = res.metrics["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert res.metrics["macs_before"] > steps[0]["macs"] > steps[1]["macs"] == res.metrics["macs_after"]
    assert steps[1]["macs"] <= 0.45 * res.metrics["macs_before"]
    assert seen == [(1, 2), (2, 2)]  # one fine-tuning epoch after each step, counted over the whole stage
    assert res.lineage["config"]["steps"] == 2


def test_output_distillation_is_zero_for_the_teachers_own_outputs(tiny, data):
    from edgeslim.components.reference.detector import output_distill_loss

    x = torch.from_numpy(data.x_train[:8])
    with torch.no_grad():
        t = tiny(x)
        other = DigitsDetector(width=8, head_hidden=8).eval()(x)
    assert float(output_distill_loss(t, t)) == pytest.approx(0.0, abs=1e-4)
    assert float(output_distill_loss(other, t)) > 0.0


def test_output_distillation_makes_the_student_imitate_the_teacher(tiny, data):
    import copy

    # A teacher unlike the labels: its class scores sit near 0.5 on every cell.
    teacher = copy.deepcopy(tiny)
    with torch.no_grad():
        for head in teacher.head:
            head.cls[-1].bias.fill_(0.0)
    x = torch.from_numpy(data.x_val)
    mean_score = {}
    for alpha in (0.0, 1.0):
        student = train_detector(copy.deepcopy(tiny), data.x_train[:64], data.y_train[:64], epochs=2,
                                 batch_size=16, lr=1e-2, teacher=teacher, output_alpha=alpha)
        with torch.no_grad():
            mean_score[alpha] = float(torch.cat([o.flatten() for o in student(x)[1::2]]).mean())
    # Labels alone push background scores down; the teacher's outputs pull them up.
    # 0.0008-0.0010 in every run of tests/spread.json: small (two epochs on 64 images), never reversed
    assert measured("detect.output_distill_score_gain", mean_score[1.0] - mean_score[0.0]) > 0.0
