"""The semantic pruning path, once and small: a segmenter trained a few epochs on shape scenes, pruned to
half its MACs with one fine-tuning epoch, keeps its per-pixel classifier conv whole and still segments."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.data import Splits
from edgeslim.components.common.stage_configs import ChannelPruneConfig
from edgeslim.components.common.tasks import task_from_dict

torch = pytest.importorskip("torch")
nn = torch.nn
TASK = task_from_dict({"kind": "segmentation", "num_classes": 4})


class TinySegmenter(nn.Module):
    """Two conv blocks, a 1x1 classifier conv of the 4 classes, upsampled back to the input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.classifier = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.classifier(self.body(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


def _pixel_accuracy(model, x, y) -> float:
    with torch.no_grad():
        pred = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


@pytest.fixture(scope="module")
def pruned():
    from edgeslim.components.tasks.segmentation.reference import as_inputs, shape_scenes
    from edgeslim.components.tasks.segmentation.train import prune_segmenter, train_segmenter

    images, maps = shape_scenes(48, size=32, seed=0)
    x, y = as_inputs(images), maps.astype(np.int64)
    data = Splits(x_train=x[:32], y_train=y[:32], x_val=x[32:40], y_val=y[32:40], x_test=x[40:], y_test=y[40:])
    torch.manual_seed(0)
    model = train_segmenter(TinySegmenter(), data, TASK, epochs=6, lr=1e-2, batch_size=8)
    config = ChannelPruneConfig.from_dict({"keep_fraction": 0.5, "steps": 1, "finetune_epochs": 2, "lr": 5e-3,
                                           "batch_size": 8, "importance": "l1"}, prefix="prune")
    return model, prune_segmenter(model, config, data=data, task=TASK), data


def test_pruning_keeps_the_classifier_conv_and_halves_the_macs(pruned):
    model, result, _ = pruned
    assert result.metrics["heads_kept"] == ["classifier"]
    assert result.model.classifier.out_channels == 4
    assert result.metrics["macs_after"] <= 0.6 * result.metrics["macs_before"]
    body = [m.out_channels for m in result.model.body if isinstance(m, nn.Conv2d)]
    assert sum(body) < sum(m.out_channels for m in model.body if isinstance(m, nn.Conv2d))
    assert result.lineage["ignored_layers"] == ["classifier"]


def test_the_pruned_model_still_predicts_masks(pruned):
    model, result, data = pruned
    with torch.no_grad():
        out = result.model.eval()(torch.from_numpy(data.x_test))
    assert tuple(out.shape) == (len(data.x_test), 4, 32, 32)
    background = float((data.y_test == 0).mean())
    parent, child = _pixel_accuracy(model, data.x_test, data.y_test), _pixel_accuracy(result.model, data.x_test,
                                                                                      data.y_test)
    # both beat "all background": the pruned child still finds most of the shapes' pixels
    assert parent > background and child > background, (parent, child, background)
    pred = out.argmax(1).numpy()
    assert (pred[data.y_test > 0] > 0).mean() > 0.5
