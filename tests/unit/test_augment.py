"""Augmentation is a training setting: nothing is augmented unless a stage's ``augment`` asks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.stage_configs import ChannelPruneConfig, LogitDistillConfig
from edgeslim.components.recipe import recipe_from_dict
from edgeslim.components.transform.train import TrainConfig, augmentation, fit, random_hflip, random_shift
from edgeslim.pipelines.demo import DEMO_RECIPE


class Recorder(nn.Module):
    """A linear model over 3x6x10 images that records every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 6 * 10, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def _batches(augment) -> tuple[np.ndarray, list[torch.Tensor]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 6, 10)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    model = Recorder()
    fit(model, TrainConfig(epochs=2, lr=1e-3, batch_size=16, augment=augment, seed=0), x=x, y=y)
    return x, model.seen


def test_no_augmentation_by_default_trains_on_the_inputs_as_given():
    assert LogitDistillConfig().augment == [] and ChannelPruneConfig().augment == []
    assert augmentation([]) is None
    x, seen = _batches(augmentation(LogitDistillConfig().augment))
    assert len(seen) == 2
    for batch in seen:  # the same rows (shuffled), never rolled or flipped
        assert sorted(map(bytes, batch.numpy())) == sorted(map(bytes, x))


def test_hflip_mirrors_about_half_of_the_images_and_shift_rolls_the_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(64 * 2 * 3 * 5, dtype=torch.float32).reshape(64, 2, 3, 5)
    out = random_hflip(x, gen)
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48
    rolled = random_shift(x, torch.Generator().manual_seed(1))
    assert any(torch.equal(rolled, torch.roll(x, (dy, dx), (2, 3))) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    flat = torch.zeros(4, 7)  # not an image batch: left alone
    assert random_hflip(flat, gen) is flat and random_shift(flat, gen) is flat
    chained = augmentation(["shift", "hflip"])
    assert chained(x, torch.Generator().manual_seed(2)).shape == x.shape


def test_recipes_take_augment_per_training_stage_and_refuse_unknown_names():
    d = yaml.safe_load(DEMO_RECIPE.read_text())
    r = recipe_from_dict(d)
    assert [getattr(s, "augment", None) for s in r.stages] == [["shift"], ["shift"], None, ["shift"]]
    bad = copy.deepcopy(d)
    bad["stages"][0]["distill"]["augment"] = ["rotate"]
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(bad)
    assert "augment" in str(err.value) and "shift" in str(err.value) and "\n" not in str(err.value)
    twice = copy.deepcopy(d)
    twice["stages"][1]["prune"]["augment"] = ["hflip", "hflip"]
    with pytest.raises(ConfigError, match=r"prune.*augment.*list each once"):
        recipe_from_dict(twice)


def test_a_detectors_label_trained_stages_refuse_augmentation():
    from edgeslim.components.tasks.detection.train import apply_detector_stages

    x = np.zeros((4, 3, 16, 16), np.float32)
    boxes = np.empty(4, dtype=object)
    boxes[:] = [np.array([[1, 1, 8, 8, 0]], np.float32)] * 4
    data = Splits(x, boxes, x, boxes, x, boxes, source="tiny")
    with pytest.raises(ConfigError, match=r"prune.augment: a detector's prune trains on its box labels"):
        apply_detector_stages(nn.Conv2d(3, 5, 1), [ChannelPruneConfig(augment=["hflip"])], data=data)
