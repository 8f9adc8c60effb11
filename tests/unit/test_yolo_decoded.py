"""Ultralytics-style detectors: the decoded (N, 4+nc, A) output, its built-in decoder, how `edgeslim init`
recognises it, and the export of a forward that returns auxiliaries beside its tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.components.common.data import Splits
from edgeslim.components.tasks.detection.runtime import decode_outputs, infer_decoder, yolo_strides
from edgeslim.components.common.errors import ConfigError, SourceError
from edgeslim.components.common.model_outputs import tensor_outputs
from edgeslim.components.common.stage_configs import OnnxExportConfig
from edgeslim.components.common.tasks import task_from_dict
from edgeslim.components.export import export
from edgeslim.components.tasks.detection.evaluate import onnx_detections, torch_detections


def _task(**decoder):
    return task_from_dict({"kind": "detection", "num_classes": 2,
                           "decoder": {"format": "yolo-decoded", **decoder}})


def _decoded(rows):
    """One image's (4+2, A) output from rows (cx, cy, w, h, score0, score1)."""
    return np.asarray(rows, np.float32).T[None]


def test_yolo_decoded_turns_centre_boxes_into_corners_with_the_best_class():
    out = _decoded([[50, 40, 20, 10, 0.1, 0.8], [10, 10, 4, 4, 0.005, 0.002]])
    (dets,) = decode_outputs([out], _task(), ["output"])
    np.testing.assert_allclose(dets, [[40, 35, 60, 45, 0.8, 1]], rtol=1e-6)  # the 0.005 box is under min_score


def test_yolo_decoded_nms_is_class_aware_and_capped():
    rows = [[50, 50, 20, 20, 0.9, 0.0], [51, 50, 20, 20, 0.8, 0.0],   # same object, same class: one kept
            [50, 50, 20, 20, 0.0, 0.7],                                # same place, other class: kept
            [150, 150, 20, 20, 0.6, 0.0]]
    (dets,) = decode_outputs([_decoded(rows)], _task(), ["output"])
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert dets[:, 5].tolist() == [0, 1, 0]
    (capped,) = decode_outputs([_decoded(rows)], _task(max_detections=2), ["output"])
    assert capped[:, 4].tolist() == pytest.approx([0.9, 0.7])


def test_yolo_decoded_applies_the_sigmoid_to_logits():
    (dets,) = decode_outputs([_decoded([[50, 50, 20, 20, -10.0, 0.0]])], _task(scores="logits"), ["output"])
    assert dets[0, 4] == pytest.approx(0.5) and dets[0, 5] == 1


def test_a_wrong_channel_count_names_the_shapes_and_the_fix():
    with pytest.raises(ConfigError, match=r"expected \[N, 6, A\].*output \[1, 7, 3\].*num_classes"):
        decode_outputs([np.zeros((1, 7, 3), np.float32)], _task(), ["output"])


def test_a_yolo_decoded_recipe_needs_no_heads():
    task = _task(strides=[8, 16, 32])
    assert task.decoder.heads == [] and task.decoder.strides == [8, 16, 32]
    with pytest.raises(ConfigError, match="task.decoder.heads: empty.*yolo-decoded"):
        task_from_dict({"kind": "detection", "num_classes": 2})


def test_init_recognises_the_decoded_output_and_its_strides():
    assert yolo_strides(8400, (640, 640)) == [8, 16, 32]
    assert yolo_strides(144 + 36 + 9, (48, 48)) == [4, 8, 16]
    assert yolo_strides(1000, (48, 48)) == []
    dec = infer_decoder(["output"], [[2, 7, 8400]], (640, 640), 3)
    assert dec == {"format": "yolo-decoded", "num_classes": 3, "output": "output", "strides": [8, 16, 32]}
    # The model's own strides win when their grids hold the anchors; a model with more classes than the
    # labels use keeps its class count.
    assert infer_decoder(["output"], [[2, 84, 5376]], (512, 512), 3, [8, 16, 32])["num_classes"] == 80
    assert infer_decoder(["output"], [[2, 7, 8400]], (640, 640), 3, [4, 8])["strides"] == [8, 16, 32]


def test_init_refuses_raw_dfl_maps_and_unknown_outputs_in_one_line():
    maps = [[1, 67, 80, 80], [1, 67, 40, 40], [1, 67, 20, 20]]  # 4 * 16 bins + 3 classes
    with pytest.raises(ConfigError, match="16 distribution bins.*model.model\\[-1\\].export = True.*decode_fn"):
        infer_decoder(["output_0", "output_1", "output_2"], maps, (640, 640), 3)
    with pytest.raises(ConfigError, match="task.decode_fn"):
        infer_decoder(["output"], [[2, 10]], (64, 64), 3)
    with pytest.raises(ConfigError, match=r"decoded YOLO output with 3 classes, but the labels have 5"):
        infer_decoder(["output"], [[2, 7, 8400]], (640, 640), 5)


class _DecodedWithExtras(torch.nn.Module):
    """Returns what Ultralytics' DetectionModel returns in eval mode: (decoded, {raw head values})."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 8, stride=8)

    def forward(self, x):
        y = self.conv(x).flatten(2)                                  # (N, 4+2, A)
        decoded = torch.cat([y[:, :4].abs() * 8 + 4, y[:, 4:].sigmoid()], 1)
        return decoded, {"boxes": y[:, :4], "scores": y[:, 4:], "feats": [y]}


def test_a_forward_with_auxiliaries_exports_its_decoded_tensor(tmp_path):
    torch.manual_seed(0)
    model = _DecodedWithExtras().eval()
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    y = np.empty(5, object)
    y[:] = [np.array([[2, 2, 20, 20, 1]], np.float32)] * 5
    data = Splits(x, y, x, y, x, y)
    res = export(model, OnnxExportConfig(check_samples=5), data=data, out_path=tmp_path / "m.onnx")
    task = _task(min_score=0.0)
    onnx_dets, outs, names = onnx_detections(res.model, x, task)
    assert names == ["output"] and outs[0].shape == (5, 6, 16)
    for a, b in zip(onnx_dets, torch_detections(model, x, task)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_forward_without_tensors_is_one_line():
    with pytest.raises(SourceError, match="returns a dict .*training mode.*export = True"):
        tensor_outputs({"boxes": torch.zeros(1, 64, 8), "scores": torch.zeros(1, 3, 8)})
