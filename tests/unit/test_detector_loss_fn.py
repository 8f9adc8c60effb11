"""A detector's training loss belongs to the recipe: an Ultralytics YOLOv8n trains on its labels with
Ultralytics' own v8DetectionLoss by itself, a `task.loss_fn: module:function` from a module outside the repository
trains any detector and is called as documented, and a task.loss_fn that cannot be used is one line naming it.
YOLOv8n runs at 128x128 on 8 synthetic images (its real size is 640: same code path, fewer anchors)."""

from __future__ import annotations

import copy
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.integration.test_ultralytics_detectors import _images
from tests.unit.test_prune_any_detector import NC as TINY_NC
from tests.unit.test_prune_any_detector import TinyYolo

YOLO_NC, SIZE = 3, 128


def _splits(x, y):
    from edgeslim.components.common.data import Splits

    return Splits(x_train=x[:8], y_train=y[:8], x_val=x[8:10], y_val=y[8:10], x_test=x[10:], y_test=y[10:],
                  source="synthetic")


@pytest.fixture(scope="module")
def yolo_data():
    x, y = _images(12, 0, SIZE)
    return _splits(x, y)


@pytest.fixture(scope="module")
def tiny_data():
    """32x32 images with one bright square of class 0 or 1 each; labels in pixels."""
    rng = np.random.default_rng(0)
    x = np.zeros((12, 3, 32, 32), np.float32)
    y = np.empty(12, object)
    for i in range(12):
        side, c = int(rng.integers(8, 16)), i % TINY_NC
        x1, y1 = (int(v) for v in rng.integers(0, 32 - side, 2))
        x[i, c, y1:y1 + side, x1:x1 + side] = 1.0
        y[i] = np.array([[x1, y1, x1 + side, y1 + side, c]], np.float32)
    return _splits(x, y)


@torch.no_grad()
def _loss_on(model, loss, x, labels) -> float:
    """The label loss of ``model`` (a copy, in training mode as it trains) on one fixed batch."""
    m = copy.deepcopy(model).train()
    return float(loss(m(torch.from_numpy(x)), [torch.from_numpy(b) for b in labels], m))


def test_an_ultralytics_detector_distills_with_ultralytics_own_loss_and_lowers_it(yolo_data, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    from edgeslim.components.common.stage_configs import LogitDistillConfig
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.tasks.detection.label_loss import UltralyticsLoss
    from edgeslim.components.tasks.detection.train import distill_detector

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml").model.eval()  # args is a plain dict here: the loss gains come from Ultralytics' defaults
    model.model[-1].export = True  # registered for deployment: its decoded output alone
    args = dict(model.args)
    task = task_from_dict({"kind": "detection", "num_classes": 80,
                           "decoder": {"format": "yolo-decoded", "strides": [8, 16, 32]}})
    loss = UltralyticsLoss(model)
    assert loss.gains == {"box": 7.5, "cls": 0.5, "dfl": 1.5}
    before = _loss_on(model, loss, yolo_data.x_train, yolo_data.y_train)
    cfg = LogitDistillConfig(student="previous", alpha=0.0, epochs=4, lr=2e-3, batch_size=4)
    res = distill_detector(model, cfg, data=yolo_data, teacher=model, task=task)
    after = _loss_on(res.model, loss, yolo_data.x_train, yolo_data.y_train)
    assert res.metrics["loss_kind"] == res.lineage["loss"] == "ultralytics v8DetectionLoss (labels)"
    assert after < before, (before, after)
    # the trained model is what was registered, minus what training leaves behind
    assert res.model.args == args and "criterion" not in vars(res.model) and res.model.model[-1].export is True
    with torch.no_grad():
        assert res.model(torch.from_numpy(yolo_data.x_test)).shape == (2, 4 + 80, sum((SIZE // s) ** 2 for s in (8, 16, 32)))


LOSSES = '''
import torch

CALLS = []

def cells(outputs, targets, model):
    """Class BCE on the cells whose centres fall inside a labelled box: reads the documented arguments."""
    scores = outputs["scores"]                       # (N, nc, A) logits of a square grid
    side = int(round(scores.shape[-1] ** 0.5))
    stride = 32 / side
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    want = torch.zeros_like(scores)
    for i, t in enumerate(targets):
        for x1, y1, x2, y2, c in t.tolist():
            inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
            want[i, int(c)] = torch.maximum(want[i, int(c)], inside.flatten().float())
    CALLS.append({"outputs": type(outputs).__name__, "targets": [t.clone() for t in targets],
                  "training": model.training, "model": model})
    return torch.nn.functional.binary_cross_entropy_with_logits(scores, want)

def per_image(outputs, targets, model):
    return outputs["scores"].mean((1, 2))

def detached(outputs, targets, model):
    return outputs["scores"].mean().detach()

def broken(outputs, targets, model):
    return targets[0][10, 0]

NOT_A_FUNCTION = 3
'''


@pytest.fixture()
def user_losses(tmp_path, monkeypatch):
    (tmp_path / "my_det_losses.py").write_text(textwrap.dedent(LOSSES))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_det_losses", None)
    import my_det_losses

    yield my_det_losses
    sys.modules.pop("my_det_losses", None)


def _tiny_task(loss_fn: str):
    from edgeslim.components.common.tasks import task_from_dict

    return task_from_dict({"kind": "detection", "num_classes": TINY_NC, "loss_fn": loss_fn,
                           "decoder": {"format": "yolo-decoded", "strides": [2]}})


def test_a_user_loss_fn_from_outside_the_repo_is_called_as_documented_and_trains(tiny_data, user_losses):
    from edgeslim.components.common.stage_configs import ChannelPruneConfig
    from edgeslim.components.tasks.detection.train import prune_detector

    torch.manual_seed(0)
    model = TinyYolo().eval()
    model.head.export = True
    before = _loss_on(model, user_losses.cells, tiny_data.x_train, tiny_data.y_train)
    user_losses.CALLS.clear()
    cfg = ChannelPruneConfig(keep_fraction=0.6, finetune_epochs=6, batch_size=4, lr=1e-2, alpha=0.3)
    res = prune_detector(model, cfg, data=tiny_data, task=_tiny_task("my_det_losses:cells"))
    calls = list(user_losses.CALLS)
    after = _loss_on(res.model, user_losses.cells, tiny_data.x_train, tiny_data.y_train)
    assert len(calls) == 6 * 2  # 6 epochs of 2 batches
    labels = {tuple(b.reshape(-1).tolist()) for b in tiny_data.y_train}
    for call in calls:
        # the training-mode return value, the batch's boxes in input pixels one (k, 5) tensor per image, the model
        assert call["outputs"] == "dict" and call["training"] and len(call["targets"]) == 4
        assert all(t.dtype == torch.float32 and t.shape == (1, 5) and tuple(t.reshape(-1).tolist()) in labels
                   for t in call["targets"])
        assert call["model"] is not model and type(call["model"]) is TinyYolo
    assert {tuple(t.reshape(-1).tolist()) for c in calls[:2] for t in c["targets"]} == labels  # one epoch sees all
    kind = "task.loss_fn my_det_losses:cells (labels) with output distillation from the unpruned model (alpha 0.3)"
    assert res.metrics["finetune_loss_kind"] == res.lineage["finetune_loss"] == kind
    assert res.metrics["macs_after"] < res.metrics["macs_before"]
    assert after < before, (before, after)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:loss", "task.loss_fn 'no_such_module_xyz:loss': cannot import module 'no_such_module_xyz'"),
    ("my_det_losses:missing", "task.loss_fn 'my_det_losses:missing': module 'my_det_losses' has no function 'missing'"),
    ("my_det_losses:NOT_A_FUNCTION", "'NOT_A_FUNCTION' in module 'my_det_losses' is a int, not a function"),
    ("my_det_losses:per_image", "task.loss_fn 'my_det_losses:per_image' returned a tensor of shape [4]; it must "
                                "return one scalar tensor"),
    ("my_det_losses:detached", "returned a tensor without a gradient"),
    ("my_det_losses:broken", "task.loss_fn 'my_det_losses:broken' raised IndexError"),
])
def test_a_task_loss_fn_that_cannot_be_used_is_one_line_naming_it(spec, message, tiny_data, user_losses):
    from edgeslim.components.common.errors import EdgeslimError
    from edgeslim.components.common.stage_configs import LogitDistillConfig
    from edgeslim.components.tasks.detection.train import distill_detector

    model = TinyYolo().eval()
    with pytest.raises(EdgeslimError) as err:
        distill_detector(model, LogitDistillConfig(student="previous", epochs=1, batch_size=4), data=tiny_data,
                         teacher=model, task=_tiny_task(spec))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_task_loss_fn_is_checked_in_the_recipe_and_before_the_run(tiny_data):
    from edgeslim.components.common.errors import ConfigError
    from edgeslim.components.tasks.detection.evaluate import check_detector

    with pytest.raises(ConfigError, match=r"task.loss_fn: got 'my loss'; use 'package.module:function'"):
        _tiny_task("my loss")
    with pytest.raises(ConfigError, match="task.loss_fn 'no_such_module_xyz:f': cannot import"):
        check_detector(TinyYolo().eval(), tiny_data, _tiny_task("no_such_module_xyz:f"))
