"""Pruning a detector edgeslim did not build, without its library: split blocks found by class name become
split-free twins, the layers before the outputs and a frozen decode conv stay whole, and the fine-tuning
matches the unpruned model's raw outputs (no labels). A tiny YOLO-shaped model written here stands in for
Ultralytics' (conv/bn/act blocks, a C2f with chunk, a head returning a decoded output in eval and its raw
values in training, a DFL-like fixed conv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.components.common.data import Splits

NC, REG = 2, 4


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv(3 * self.c, c2, 1)
        self.m = nn.ModuleList([nn.Sequential(Conv(self.c, self.c), Conv(self.c, self.c))])

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Head(nn.Module):
    export = False

    def __init__(self, c: int):
        super().__init__()
        self.box = nn.Sequential(Conv(c, c), nn.Conv2d(c, 4 * REG, 1))
        self.cls = nn.Sequential(Conv(c, c), nn.Conv2d(c, NC, 1))
        self.dfl = nn.Conv2d(REG, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG, dtype=torch.float).view(1, REG, 1, 1)

    def forward(self, x):
        b = self.box(x).flatten(2)
        raw = {"boxes": b, "scores": self.cls(x).flatten(2)}
        if self.training:
            return raw
        n, _, a = b.shape
        dist = self.dfl(b.view(n, 4, REG, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        y = torch.cat((dist, raw["scores"].sigmoid()), 1)
        return y if self.export else (y, raw)


class TinyYolo(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)
        self.block = C2f(16, 32)
        self.block.f, self.block.i = -1, 1  # what a parent model may read from its layers
        self.head = Head(32)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 32, 32), dtype=np.float32)
    boxes = np.empty(12, object)
    for i in range(12):
        boxes[i] = np.array([[2, 2, 20, 20, i % NC]], np.float32)
    return Splits(x_train=x[:8], y_train=boxes[:8], x_val=x[8:10], y_val=boxes[8:10], x_test=x[10:],
                  y_test=boxes[10:])


def test_split_blocks_become_twins_with_the_same_outputs_and_their_attributes():
    from edgeslim.components.transform.yolo import SplitFreeC2f, split_free

    torch.manual_seed(0)
    model = TinyYolo().eval()
    twin, swapped = split_free(model)
    assert swapped == ["block"] and isinstance(twin.block, SplitFreeC2f) and isinstance(model.block, C2f)
    assert (twin.block.f, twin.block.i) == (-1, 1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


def test_a_block_named_c2f_that_computes_something_else_is_left_alone():
    from edgeslim.components.transform.yolo import split_free

    class Odd(C2f):
        def forward(self, x):  # halves swapped: no twin of ours reproduces it
            a, b = self.cv1(x).chunk(2, 1)
            return self.cv2(torch.cat([b, a, self.m[0](a)], 1))

    model = nn.Sequential(Odd(3, 8)).eval()
    assert split_free(model)[1] == []


def test_the_layers_before_the_outputs_and_a_frozen_decode_conv_are_found():
    from edgeslim.components.transform.yolo import last_layers

    model = TinyYolo().eval()
    assert last_layers(model, torch.rand(1, 3, 32, 32)) == ["head.box.1", "head.cls.1", "head.dfl"]
    assert not model.head.dfl.weight.requires_grad  # the model itself is not changed


def test_conv_bn_act_blocks_fold_for_qat():
    from edgeslim.components.tasks.detection.qat import fold_batchnorm

    torch.manual_seed(0)
    model = TinyYolo().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 2.0)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x)[0], model(x)[0], rtol=1e-4, atol=1e-4)


def test_a_detector_without_map_pairs_is_pruned_and_fine_tuned_on_its_raw_outputs(data):
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.tasks.detection.train import prune_detector

    torch.manual_seed(0)
    model = TinyYolo().eval()
    model.head.export = True  # registered in export mode: training still matches the raw values
    res = prune_detector(model, ChannelPruneConfig(keep_fraction=0.6, finetune_epochs=2, batch_size=4), data=data)
    m = res.metrics
    assert m["macs_after"] <= 0.65 * m["macs_before"]
    assert "label-free" in m["finetune_loss_kind"] and np.isfinite(m["finetune_loss"])
    assert "sqnr_db_val_finetuned" in m["steps"][-1] and np.isfinite(m["output_sqnr_db_val"])
    pruned = res.model
    assert (pruned.head.box[1].out_channels, pruned.head.cls[1].out_channels) == (4 * REG, NC)
    assert torch.equal(pruned.head.dfl.weight, model.head.dfl.weight) and not pruned.head.dfl.weight.requires_grad
    assert pruned.head.export is True and res.lineage["split_free_blocks"] == ["block"]
    x = torch.from_numpy(data.x_test)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 4 + NC, 16 * 16)


def test_pruning_a_detector_gives_its_stale_batchnorm_statistics_the_training_inputs_average(data):
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.tasks.detection.train import prune_detector

    torch.manual_seed(0)
    model = TinyYolo().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.03  # Ultralytics' BatchNorm momentum: a short fine-tune cannot catch up
            m.running_mean.fill_(5.0)  # statistics nothing like the training inputs'
    model.head.export = True
    res = prune_detector(model, ChannelPruneConfig(keep_fraction=0.6, finetune_epochs=1, batch_size=4), data=data)
    stem = res.model.stem
    with torch.no_grad():  # the stem's BatchNorm sees the conv of the raw training images
        feats = stem.conv(torch.from_numpy(data.x_train))
    want = feats.mean(dim=(0, 2, 3))
    assert torch.allclose(stem.bn.running_mean, want, atol=1e-4), (stem.bn.running_mean, want)
