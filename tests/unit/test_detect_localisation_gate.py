"""The detection gate checks box precision (mAP@0.5:0.95), not only mAP@0.5 and the scores."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.tasks import task_from_dict
from edgeslim.components.tasks.detection.config import DetectionGateConfig
from edgeslim.components.tasks.detection.evaluate import detection_metrics, gate_detection


def _scene(seed=0, n_images=20):
    rng = np.random.default_rng(seed)
    gts = []
    for _ in range(n_images):
        k = int(rng.integers(1, 4))
        xy = rng.uniform(0, 200, (k, 2))
        wh = rng.uniform(30, 90, (k, 2))
        gts.append(np.hstack([xy, xy + wh, rng.integers(0, 3, (k, 1))]).astype(np.float32))
    return gts


def _predict(gts, jitter, seed=1):
    """Detections at the labelled boxes, each side moved by up to ``jitter`` of the box size."""
    rng = np.random.default_rng(seed)
    preds = []
    for g in gts:
        size = np.repeat(g[:, 2:4] - g[:, 0:2], 2, axis=0).reshape(len(g), 4)
        boxes = g[:, :4] + rng.uniform(-jitter, jitter, (len(g), 4)) * size
        preds.append(np.hstack([boxes, np.full((len(g), 1), 0.9), g[:, 4:5]]).astype(np.float32))
    return preds


def _verdict(gts, cand, gate=DetectionGateConfig()):
    src = detection_metrics(_predict(gts, 0.0), gts, 3, 0.25)
    return src, gate_detection({"source": {"detection": src},
                                "candidate": {"detection": detection_metrics(cand, gts, 3, 0.25)}}, gate)


def test_boxes_that_lose_precision_are_rejected_although_map50_held():
    gts = _scene()
    cand = _predict(gts, 0.08)          # every box still overlaps its object at IoU >= 0.5
    src, verdict = _verdict(gts, cand)
    m = detection_metrics(cand, gts, 3, 0.25)
    assert src["map50"] - m["map50"] <= DetectionGateConfig().max_map_drop
    assert src["map50_95"] - m["map50_95"] > 10
    assert not verdict["passed"]
    assert {c["name"] for c in verdict["checks"] if not c["passed"]} == {"map50_95_drop"}
    assert verdict["summary"].startswith("box precision collapsed while mAP@0.5 held")
    assert f"{src['map50_95']:.2f} -> {m['map50_95']:.2f}" in verdict["summary"]


def test_boxes_within_a_pixel_pass_and_the_check_is_reported():
    gts = _scene()
    _, verdict = _verdict(gts, _predict(gts, 0.003))
    assert verdict["passed"], verdict["summary"]
    (check,) = [c for c in verdict["checks"] if c["name"] == "map50_95_drop"]
    assert check["threshold"] == 2.0 and check["passed"]
    assert "mAP@0.5:0.95" in verdict["summary"]


def test_the_allowed_drop_is_a_recipe_setting():
    gts = _scene()
    loose = DetectionGateConfig(max_map50_95_drop=60.0)
    assert _verdict(gts, _predict(gts, 0.08), loose)[1]["passed"]
    task = task_from_dict({"kind": "detection", "num_classes": 3, "decoder": {"format": "yolo-decoded"},
                           "gate": {"max_map50_95_drop": 5}})
    assert task.gate.max_map50_95_drop == 5.0
    with pytest.raises(ConfigError, match="task.gate.max_map50_95_drop: got -1"):
        task_from_dict({"kind": "detection", "num_classes": 3, "decoder": {"format": "yolo-decoded"},
                        "gate": {"max_map50_95_drop": -1}})
