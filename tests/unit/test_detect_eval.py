"""mAP (COCO-style), precision/recall at the threshold, mean TP score, and the detection gate."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.tasks.detection.config import DetectionGateConfig
from edgeslim.components.common.average_precision import average_precision
from edgeslim.components.tasks.detection.evaluate import detection_metrics, gate_detection

GT = [np.array([[0, 0, 10, 10, 0], [20, 20, 30, 30, 1]], np.float32),
      np.array([[5, 5, 25, 25, 1]], np.float32)]


def _perfect(score=0.9):
    return [np.hstack([g[:, :4], np.full((len(g), 1), score), g[:, 4:5]]) for g in GT]


def test_perfect_detections_score_100_and_report_their_mean_score():
    m = detection_metrics(_perfect(0.9), GT, num_classes=2, score_threshold=0.25)
    assert m["map50"] == 100.0 and m["map50_95"] == 100.0
    assert m["precision"] == 100.0 and m["recall"] == 100.0
    assert m["mean_tp_score"] == pytest.approx(0.9)
    assert m["per_class_ap50"] == {"0": 100.0, "1": 100.0}


def test_ap_is_the_101_point_interpolated_area():
    # Two objects; detections by score: TP, FP, TP.
    ap = average_precision(np.array([True, False, True]), n_gt=2)
    assert ap == pytest.approx((51 * 1.0 + 50 * (2 / 3)) / 101)
    assert average_precision(np.array([], bool), n_gt=3) == 0.0


def test_loose_boxes_keep_map50_but_lose_map50_95():
    preds = _perfect()
    preds = [p.copy() for p in preds]
    for p in preds:
        p[:, 2:4] += 1.5  # IoU ~0.75 for the 10 px boxes
    m = detection_metrics(preds, GT, 2, 0.25)
    assert m["map50"] == 100.0 and m["map50_95"] < 80.0


def test_duplicates_and_wrong_classes_are_false_positives():
    preds = [np.vstack([_perfect()[0], [[0, 0, 10, 10, 0.95, 1]]]), _perfect()[1]]
    m = detection_metrics(preds, GT, 2, 0.25)
    assert m["precision"] == pytest.approx(75.0)
    assert m["recall"] == 100.0
    assert m["per_class_ap50"]["1"] < 100.0


def _metrics(src, cand):
    return {"source": {"detection": src}, "candidate": {"detection": cand}}


def test_collapsed_confidence_is_rejected_even_though_map_held():
    src = detection_metrics(_perfect(0.96), GT, 2, 0.25)
    cand = detection_metrics(_perfect(0.085), GT, 2, 0.25)  # same ranking, scores squashed
    assert cand["map50"] == src["map50"]
    verdict = gate_detection(_metrics(src, cand), DetectionGateConfig())
    assert not verdict["passed"]
    assert verdict["summary"].startswith("confidences collapsed while mAP held")
    assert "0.960 -> 0.085" in verdict["summary"]
    failed = {c["name"] for c in verdict["checks"] if not c["passed"]}
    assert failed == {"mean_tp_score_drop", "recall_drop"}


def test_a_map_drop_fails_without_the_collapse_wording_and_a_faithful_candidate_passes():
    src = detection_metrics(_perfect(0.9), GT, 2, 0.25)
    worse = detection_metrics([_perfect(0.9)[0], np.zeros((0, 6), np.float32)], GT, 2, 0.25)
    verdict = gate_detection(_metrics(src, worse), DetectionGateConfig())
    assert not verdict["passed"] and "map50_drop" in verdict["summary"]
    assert "collapsed" not in verdict["summary"]
    ok = gate_detection(_metrics(src, detection_metrics(_perfect(0.89), GT, 2, 0.25)), DetectionGateConfig())
    assert ok["passed"] and ok["summary"].startswith("passed")


def _scenes(rng, images=30, classes=3):
    """Random labelled scenes and detections near the labels (some lost, some false, some duplicated)."""
    gts, preds = [], []
    for _ in range(images):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 150, (k, 2))
        g = np.hstack([xy, xy + rng.uniform(10, 60, (k, 2)), rng.integers(0, classes, (k, 1))]).astype(np.float32)
        near = np.repeat(g, 2, axis=0)[rng.uniform(size=2 * k) < 0.6]  # found once, twice or not at all
        near[:, :4] += rng.normal(0, 4, (len(near), 4))
        false = np.hstack([rng.uniform(0, 150, (3, 2)), rng.uniform(150, 210, (3, 2)), np.zeros((3, 1))])
        false[:, 4] = rng.integers(0, classes, 3)
        boxes = np.vstack([near, false])
        gts.append(g)
        preds.append(np.hstack([boxes[:, :4], rng.uniform(0, 1, (len(boxes), 1)), boxes[:, 4:5]]).astype(np.float32))
    return preds, gts


def _reference_ap(preds, gts, cls, thr):
    """COCO's AP of one class at one IoU threshold, matched the plain way: each image's detections by score,
    each taking the best-overlapping label not yet taken."""
    from edgeslim.components.tasks.detection.runtime import box_iou

    scores, tps, n_gt = [], [], 0
    for p, g in zip(preds, gts):
        p, g = p[p[:, 5] == cls], g[g[:, 4] == cls]
        n_gt += len(g)
        p = p[np.argsort(-p[:, 4], kind="stable")]
        taken = np.zeros(len(g), bool)
        for box in p:
            iou = box_iou(box[None, :4], g[:, :4])[0] if len(g) else np.zeros(0)
            iou = np.where(taken | (iou < thr), -1.0, iou)
            hit = len(iou) > 0 and iou.max() >= 0
            if hit:
                taken[iou.argmax()] = True
            scores.append(box[4])
            tps.append(hit)
    order = np.argsort(-np.array(scores, np.float32), kind="stable")
    return average_precision(np.array(tps, bool)[order], n_gt)


def test_map_matches_a_plain_per_threshold_matching_and_does_not_depend_on_the_batches():
    from edgeslim.components.common.average_precision import IOU_THRESHOLDS
    from edgeslim.components.tasks.detection.records import DetectionRecorder, record_metrics

    preds, gts = _scenes(np.random.default_rng(7))
    m = detection_metrics(preds, gts, 3, 0.25)
    ap = np.array([[_reference_ap(preds, gts, c, t) for t in IOU_THRESHOLDS] for c in range(3)])
    assert m["map50"] == pytest.approx(100 * np.nanmean(ap[:, 0]), abs=1e-3)
    assert m["map50_95"] == pytest.approx(100 * np.nanmean(ap), abs=1e-3)
    assert 0 < m["map50_95"] < m["map50"] < 100
    # an evaluation matches each batch as it is decoded: any batching gives the same figures and records
    rec = DetectionRecorder(3, 0.25)
    for a in range(0, len(gts), 7):
        rec.add(preds[a:a + 7], gts[a:a + 7])
    batched = rec.records()
    assert record_metrics(batched) == m
    whole = DetectionRecorder(3, 0.25)
    whole.add(preds, gts)
    assert np.array_equal(batched.matches(), whole.records().matches())
    assert np.array_equal(batched.det_image, whole.records().det_image)
