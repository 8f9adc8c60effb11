"""The built-in decoder, NMS, user decode functions and the golden-detection match."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.tasks import task_from_dict
from edgeslim.components.tasks.detection.runtime import (
    batched_nms, box_iou, check_outputs, decode_outputs, match_detections, nms,
)


def _task(**kw):
    base = {"kind": "detection", "num_classes": 3,
            "decoder": {"heads": [{"box": "b", "cls": "c", "stride": 8}], **kw}}
    return task_from_dict(base)


def _maps(box_values, cell=(1, 2), score=0.9, cls=2, grid=4):
    box = np.zeros((1, 4, grid, grid), np.float32)
    scores = np.zeros((1, 3, grid, grid), np.float32)
    box[0, :, cell[0], cell[1]] = box_values
    scores[0, cls, cell[0], cell[1]] = score
    return box, scores


def test_ltrb_decodes_distances_from_the_cell_centre_in_strides():
    box, scores = _maps([1.0, 0.5, 2.0, 1.5])  # cell (row 1, col 2): centre (20, 12) px
    (dets,) = decode_outputs({"b": box, "c": scores}, _task())
    assert dets.shape == (1, 6)
    np.testing.assert_allclose(dets[0], [20 - 8, 12 - 4, 20 + 16, 12 + 12, 0.9, 2], rtol=1e-6)


def test_xywh_decodes_centre_offset_and_log_size():
    box, scores = _maps([0.25, -0.5, np.log(2.0), 0.0])
    (dets,) = decode_outputs({"b": box, "c": scores}, _task(box_encoding="xywh"))
    cx, cy, w, h = (2.5 + 0.25) * 8, (1.5 - 0.5) * 8, 16, 8
    np.testing.assert_allclose(dets[0, :4], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rtol=1e-6)


def test_logit_scores_go_through_a_sigmoid_and_low_scores_are_dropped():
    box, scores = _maps([1, 1, 1, 1], score=0.0)  # logit 0 -> 0.5
    (dets,) = decode_outputs({"b": box, "c": scores}, _task(scores="logits", min_score=0.6))
    assert len(dets) == 0
    (dets,) = decode_outputs({"b": box, "c": scores}, _task(scores="logits", min_score=0.4))
    assert np.isclose(dets[0, 4], 0.5)


def test_nms_suppresses_overlaps_of_one_class_only():
    dets = np.array([[0, 0, 10, 10, 0.9, 1], [1, 1, 10, 10, 0.8, 1], [1, 1, 10, 10, 0.7, 2],
                     [30, 30, 40, 40, 0.6, 1]], np.float32)
    kept = batched_nms(dets, 0.5, 100)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert box_iou(dets[:1, :4], dets[1:2, :4])[0, 0] == pytest.approx(81 / 100)


def _greedy_nms(boxes, scores, iou, limit):
    """Greedy NMS as the textbook writes it: keep the best box left, drop what overlaps it, repeat."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order and len(keep) < limit:
        i, order = order[0], order[1:]
        keep.append(i)
        order = [j for j in order if box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= iou]
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_blockwise_nms_keeps_exactly_the_boxes_greedy_nms_keeps(seed):
    """Crowded scenes of several hundred boxes (more than one block), with repeated boxes, equal scores and
    empty boxes: the blockwise NMS keeps the same boxes in the same order as the greedy loop."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(150, 400))
    xy = rng.uniform(0, 120, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (n, 2))], 1)
    boxes[rng.integers(0, n, n // 8)] = boxes[0]            # the same box several times
    boxes[rng.integers(0, n, 4), 2] = boxes[rng.integers(0, n, 4), 0]  # some without width
    scores = np.round(rng.random(n), 1)                      # many equal scores
    for iou, limit in ((0.5, 300), (0.7, 40), (0.3, 1000)):
        assert nms(boxes, scores, iou, limit).tolist() == _greedy_nms(boxes, scores, iou, limit)


def test_outputs_that_do_not_match_the_heads_name_expected_and_actual_shapes():
    task = _task()
    with pytest.raises(ConfigError) as e:
        check_outputs(["b", "c"], [(1, 4, 4, 4), (1, 5, 4, 4)], task)
    msg = str(e.value)
    assert "heads[0].cls" in msg and "[N, 3, H, W]" in msg and "[1, 5, 4, 4]" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="has no output 'b'.*output_0"):
        check_outputs(["output_0", "output_1"], [(1, 4, 4, 4), (1, 3, 4, 4)], task)


def test_a_decode_function_that_cannot_be_imported_is_one_clear_line():
    task = task_from_dict({"kind": "detection", "num_classes": 3, "decode_fn": "no_such_mod_xyz:decode"})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod_xyz'"):
        decode_outputs([np.zeros((1, 2))], task)


def test_a_decode_function_returning_the_wrong_shape_is_refused(tmp_path, monkeypatch):
    (tmp_path / "mydecode.py").write_text(textwrap.dedent("""
        import numpy as np
        def good(outputs):
            return [np.array([[0, 0, 4, 4, 0.9, 1]], np.float32) for _ in range(len(outputs[0]))]
        def bad(outputs):
            return [np.zeros((2, 5)) for _ in range(len(outputs[0]))]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mydecode", None)
    good = task_from_dict({"kind": "detection", "num_classes": 3, "decode_fn": "mydecode:good"})
    dets = decode_outputs([np.zeros((2, 7))], good)
    assert len(dets) == 2 and dets[0].shape == (1, 6)
    bad = task_from_dict({"kind": "detection", "num_classes": 3, "decode_fn": "mydecode:bad"})
    with pytest.raises(DataError, match=r"returned shape \[2, 5\] for image 0.*\(M, 6\)"):
        decode_outputs([np.zeros((2, 7))], bad)
    missing = task_from_dict({"kind": "detection", "num_classes": 3, "decode_fn": "mydecode:nothing"})
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        decode_outputs([np.zeros((2, 7))], missing)


def test_task_section_validation_is_one_line_per_problem():
    with pytest.raises(ConfigError, match="task.decoder.heads: empty"):
        task_from_dict({"kind": "detection", "num_classes": 3})
    with pytest.raises(ConfigError, match="task.kind"):
        task_from_dict({"kind": "depth"})
    with pytest.raises(ConfigError, match="task.decoder.box_encoding"):
        _task(box_encoding="cxcywh")
    with pytest.raises(ConfigError, match="task.decode_fn"):
        task_from_dict({"kind": "detection", "num_classes": 3, "decode_fn": "not a spec"})


def test_golden_detections_match_within_tolerance_and_name_what_differs():
    golden = np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 2]], np.float32)
    same = golden.copy()
    same[:, 4] += 0.01
    assert match_detections(golden, same)["ok"]
    moved = golden.copy()
    moved[1, :4] += 3  # IoU ~0.6
    res = match_detections(golden, moved, iou=0.9)
    assert not res["ok"] and res["missing"] == 1 and "not found" in res["reason"]
    collapsed = golden.copy()
    collapsed[:, 4] = 0.1
    res = match_detections(golden, collapsed, score_tol=0.05)
    assert not res["ok"] and "score differs by 0.800" in res["reason"]
    extra = np.vstack([golden, [[40, 40, 47, 47, 0.95, 0]]])
    assert match_detections(golden, extra)["extra"] == 1
