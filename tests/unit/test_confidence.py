"""Gates with confidence: each drop's interval over the evaluation images (components/common/confidence.py),
the gates that judge it (``confidence:``), the search that refuses only beyond the noise, and the report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeslim.components.common import confidence as C
from edgeslim.components.common.errors import ConfigError

# --- the statistics -----------------------------------------------------------------------------------------


def _paired_correctness(rng, n, parent_only, candidate_only):
    """Each image right/wrong under parent and candidate, the two disagreeing with the given probabilities."""
    u = rng.uniform(size=n)
    parent = np.where(u < parent_only, True, np.where(u < parent_only + candidate_only, False, rng.uniform(size=n) < 0.9))
    cand = np.where(u < parent_only, False, np.where(u < parent_only + candidate_only, True, parent))
    return parent, cand


def test_the_top1_interval_covers_a_known_drop_at_its_level():
    rng = np.random.default_rng(0)
    true_drop = 100 * (0.04 - 0.02)  # 2 pt: the candidate loses 4% of images and wins 2%
    hits = []
    for _ in range(400):
        stat = C.top1_drop(*_paired_correctness(rng, 400, 0.04, 0.02))
        iv = C.interval(stat, 0.95)
        assert iv["low"] <= iv["drop"] <= iv["high"]
        hits.append(iv["low"] <= true_drop <= iv["high"])
    # 400 draws: the share of covering intervals is 0.95 give or take 0.011 (one standard error)
    assert 0.92 <= np.mean(hits) <= 0.98
    # a lower level gives a narrower interval, on the same images
    narrow, wide = C.interval(stat, 0.8), C.interval(stat, 0.99)
    assert wide["low"] < narrow["low"] <= narrow["high"] < wide["high"]


def test_no_disagreement_is_not_certainty_and_more_images_narrow_the_bound():
    stat = C.top1_drop(np.ones(300, bool), np.ones(300, bool))
    iv = C.interval(stat, 0.95)
    assert iv["drop"] == 0.0 and iv["low"] < 0.0 < iv["high"] < 2.0  # none of 300 disagree: still about 1.3 pt
    need = C.images_needed(stat, 0.1, 0.95)
    assert need > 300
    # at the images it names, the same shares give an upper bound within the allowance; one fewer does not
    assert C.judge(stat, 0.1, 0.95).outcome == "noise"
    assert C.judge({**stat, "n": need}, 0.1, 0.95).outcome == "within"
    assert C.judge({**stat, "n": need - 1}, 0.1, 0.95).outcome == "noise"


def _records(rng, n, *, lost=0.0, moved=0.0, base=None):
    """Detection records of one class (made without boxes): per image 1-4 objects, each found with probability
    0.85 at a score in [0.3, 1), plus 0-3 false detections under 0.6. A candidate (``base`` given) loses each of
    the base's true positives with probability ``lost`` (it becomes a false detection) and moves a score by up
    to ``moved``."""
    if base is None:
        gt = rng.integers(1, 5, size=(n, 1))
        img, tp, score = [], [], []
        for i in range(n):
            found = int(rng.binomial(gt[i, 0], 0.85))
            false = int(rng.integers(0, 4))
            img += [i] * (found + false)
            tp += [True] * found + [False] * false
            score += list(rng.uniform(0.3, 1.0, found)) + list(rng.uniform(0.0, 0.6, false))
        tps = np.repeat(np.array(tp)[:, None], 10, axis=1)
        tps[:, 5:] &= rng.uniform(size=(len(tp), 1)) < 0.7  # looser boxes fail the stricter IoU thresholds
        base = C.DetectionRecords(n=n, det_image=np.array(img), det_class=np.zeros(len(img), np.int64),
                                  det_score=np.array(score), det_tp=tps, gt=gt, score_threshold=0.25)
        return _sorted(base)
    drop = base.matches()[:, 0] & (rng.uniform(size=len(base.det_score)) < lost)
    tps = base.matches() & ~drop[:, None]
    score = np.clip(base.det_score + rng.uniform(-moved, moved, len(base.det_score)), 0.0, 1.0)
    return _sorted(dataclasses.replace(base, det_tp=tps, det_score=score))


def _sorted(rec):
    """Records in the order the detection records keep: by image, then score, highest first."""
    order = np.lexsort((-rec.det_score, rec.det_image))
    return dataclasses.replace(rec, det_image=rec.det_image[order], det_class=rec.det_class[order],
                               det_score=rec.det_score[order], det_tp=rec.det_tp[order])


def _take(rec, images):
    """The records of the given images (a sample of a larger population), renumbered."""
    parts = [np.flatnonzero(rec.det_image == i) for i in images]
    keep = np.concatenate(parts)
    new = np.concatenate([np.full(len(p), j) for j, p in enumerate(parts)])
    return dataclasses.replace(rec, n=len(images), det_image=new, det_class=rec.det_class[keep],
                               det_score=rec.det_score[keep], det_tp=rec.det_tp[keep], gt=rec.gt[images])


@pytest.mark.slow
def test_the_bootstrap_interval_covers_a_known_map_drop():
    rng = np.random.default_rng(1)
    population = 4000
    parent = _records(rng, population)
    cand = _records(rng, population, lost=0.05, moved=0.1, base=parent)
    ones = np.ones((1, population), np.int32)
    true = {k: parent.scores(ones)[k][0] - cand.scores(ones)[k][0] for k in ("map50", "map50_95")}
    assert true["map50"] > 1.0  # a real drop, of a few points
    hits = {k: [] for k in true}
    for rep in range(60):
        images = np.sort(rng.choice(population, 200, replace=False))
        p, c = _take(parent, images), _take(cand, images)
        drops = C.detection_drops(p, c, resamples=300, seed=rep)
        for k in true:
            iv = C.interval(drops[f"{k}_drop"], 0.95)
            hits[k].append(iv["low"] <= true[k] <= iv["high"])
    # 60 samples of 200 images: a 95% interval covers the population's drop in most of them
    # (the percentile bootstrap runs a little narrow on a ratio statistic at this size)
    for k, h in hits.items():
        assert np.mean(h) >= 0.85, (k, np.mean(h))


def test_the_bootstrap_is_seeded_and_scores_a_resample_as_the_evaluator_scores_those_images(monkeypatch):
    from edgeslim.components.tasks.detection.evaluate import detection_metrics
    from edgeslim.components.tasks.detection.records import detection_records

    rng = np.random.default_rng(2)
    gts, preds, cands = [], [], []
    for _ in range(40):
        k = int(rng.integers(0, 4))
        xy = rng.uniform(0, 150, (k, 2))
        g = np.hstack([xy, xy + rng.uniform(20, 60, (k, 2)), rng.integers(0, 3, (k, 1))]).astype(np.float32)
        gts.append(g)
        for out, jitter in ((preds, 2.0), (cands, 5.0)):
            boxes = g[:, :4] + rng.uniform(-jitter, jitter, (k, 4))
            false = np.hstack([rng.uniform(0, 150, (2, 2)), rng.uniform(150, 200, (2, 2)),
                               rng.uniform(0, 0.5, (2, 1)), rng.integers(0, 3, (2, 1))])
            out.append(np.vstack([np.hstack([boxes, rng.uniform(0.2, 1, (k, 1)), g[:, 4:5]]), false]).astype(np.float32))
    p, c = detection_records(preds, gts, 3, 0.25), detection_records(cands, gts, 3, 0.25)
    a, b = C.detection_drops(p, c, resamples=200), C.detection_drops(p, c, resamples=200)
    assert a == b  # the same records give the same interval
    # the resamples are drawn and scored a block at a time (memory flat in the split's size): blocks of 7 rows
    # give the same draws, and so the same interval, as one block of all 200
    monkeypatch.setattr(C, "_BLOCK_COUNTS", 7 * 40)
    assert np.array_equal(C.resample_weights(40, 200), np.random.default_rng(C.SEED).multinomial(
        40, np.full(40, 1 / 40), size=200))
    assert C.detection_drops(detection_records(preds, gts, 3, 0.25), c, resamples=200) == a
    assert C.detection_drops(p, c, resamples=200, seed=1)["map50_drop"]["replicates"] != a["map50_drop"]["replicates"]
    # a resample drawing image 3 twice and leaving out image 0 scores as the evaluator scores that list of images
    w = np.ones((1, 40), np.int32)
    w[0, 0], w[0, 3] = 0, 2
    drawn = [3] + list(range(1, 40))
    for recs, dets in ((p, preds), (c, cands)):
        want = detection_metrics([dets[i] for i in drawn], [gts[i] for i in drawn], 3, 0.25)
        got = recs.scores(w)
        for k in ("map50", "map50_95", "mean_tp_score", "recall"):
            assert got[k][0] == pytest.approx(want[k], abs=1e-3), k
    # and the drop on all images is the evaluator's
    m = [detection_metrics(d, gts, 3, 0.25) for d in (preds, cands)]
    assert a["map50_drop"]["drop"] == pytest.approx(m[0]["map50"] - m[1]["map50"], abs=1e-3)


# --- the gates ----------------------------------------------------------------------------------------------


def _classifier_metrics(parent_correct, cand_correct):
    from edgeslim.components.tasks.classification.evaluate import top1_drop

    n = len(parent_correct)
    return {"source": {"metric": 100 * np.mean(parent_correct)},
            "candidate": {"metric": 100 * np.mean(cand_correct), "fidelity": {"top1_agreement": 1.0, "sqnr_db": 40.0}},
            "test_samples": n, "confidence": {"metric_drop": top1_drop(parent_correct, cand_correct)}}


def test_the_classifier_gate_judges_the_interval_only_with_a_confidence():
    from edgeslim.components.recipe import AccuracyGateConfig
    from edgeslim.components.tasks.classification.evaluate import gate

    parent = np.ones(2000, bool)
    cand = parent.copy()
    cand[:60] = False  # 3 pt lost on 2,000 images: beyond any noise
    worse = gate(_classifier_metrics(parent, cand), AccuracyGateConfig(max_metric_drop=1.0, confidence=0.95))
    assert not worse["passed"] and worse["outcome"] == "refused"
    assert "missed by" in worse["summary"] and "above the allowance beyond the noise" in worse["summary"]
    same = gate(_classifier_metrics(parent, parent), AccuracyGateConfig(max_metric_drop=1.0, confidence=0.95))
    assert same["passed"] and same["outcome"] == "passed"
    (check,) = [c for c in same["checks"] if c["name"] == "metric_drop"]
    assert check["outcome"] == "within" and check["high"] <= 1.0 and check["level"] == 0.95
    # without one, the point estimate decides, as it always did
    plain = gate(_classifier_metrics(parent, parent), AccuracyGateConfig(max_metric_drop=0.1))
    assert plain["passed"] and plain["checks"][0]["low"] is None


def test_a_detector_gate_refuses_beyond_the_noise_and_passes_a_faithful_candidate():
    from edgeslim.components.tasks.detection.config import DetectionGateConfig
    from edgeslim.components.tasks.detection.evaluate import detection_metrics, gate_detection
    from edgeslim.components.tasks.detection.records import detection_records

    rng = np.random.default_rng(3)
    gts = []
    for _ in range(60):
        k = int(rng.integers(1, 4))
        xy = rng.uniform(0, 200, (k, 2))
        gts.append(np.hstack([xy, xy + rng.uniform(30, 90, (k, 2)), rng.integers(0, 3, (k, 1))]).astype(np.float32))

    def predict(jitter):
        out = []
        for g in gts:
            size = np.repeat(g[:, 2:4] - g[:, 0:2], 2, axis=0).reshape(len(g), 4)
            out.append(np.hstack([g[:, :4] + rng.uniform(-jitter, jitter, (len(g), 4)) * size,
                                  np.full((len(g), 1), 0.9), g[:, 4:5]]).astype(np.float32))
        return out

    parent = predict(0.0)
    gate = DetectionGateConfig(confidence=0.95)
    for cand, passed in ((predict(0.08), False), (parent, True)):  # loose boxes: mAP@0.5:0.95 falls > 10 pt
        metrics = {"source": {"detection": detection_metrics(parent, gts, 3, 0.25)},
                   "candidate": {"detection": detection_metrics(cand, gts, 3, 0.25)},
                   "confidence": C.detection_drops(detection_records(parent, gts, 3, 0.25),
                                                   detection_records(cand, gts, 3, 0.25))}
        v = gate_detection(metrics, gate)
        assert v["passed"] is passed, v["summary"]
        (loc,) = [c for c in v["checks"] if c["name"] == "map50_95_drop"]
        assert loc["outcome"] == ("within" if passed else "worse")
    assert v["summary"].startswith("passed")


def test_confidence_is_a_level_in_one_line():
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.recipe import AccuracyGateConfig

    for bad in (1.0, 95, 0.2):
        with pytest.raises(ConfigError) as e:
            AccuracyGateConfig.from_dict({"confidence": bad}, prefix="gate")
        assert "gate.confidence" in str(e.value) and "0.95" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        task_from_dict({"kind": "detection", "num_classes": 2, "decoder": {"format": "yolo-decoded"},
                        "gate": {"confidence": 2}})
    assert "task.gate.confidence" in str(e.value)


# --- the search and the report ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tenth_of_a_point_gate_on_a_small_val_is_not_distinguishable_from_noise(tmp_path):
    """The search with a 0.1-pt gate and 60 validation images: no trial is refused beyond the noise, none
    passes, and the refusal says how many validation images a bound that decides needs."""
    import json

    from compress_models import digits, onnx_of, trained
    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.errors import GateRejected
    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig
    from edgeslim.components.recipe import AccuracyGateConfig
    from edgeslim.components.tasks.classification.search import quantize_auto

    d = digits()
    small = Splits(d.x_train, d.y_train, d.x_val[:60], d.y_val[:60], d.x_test, d.y_test)
    cfg = AccuracyAwareQuantizeConfig(calibrators=["percentile"], num_samples=64, max_float_layers=0, qat=False,
                                      placement="all")
    gate = AccuracyGateConfig(max_metric_drop=0.1, min_top1_agreement=0.0, min_sqnr_db=0.0, confidence=0.95)
    with pytest.raises(GateRejected) as e:
        quantize_auto(trained("cnn"), onnx_of("cnn"), cfg, data=small, parent_onnx_path=onnx_of("cnn"), gate=gate,
                      out_dir=tmp_path)
    msg = str(e.value)
    assert "not distinguishable from noise at n = 60" in msg and "\n" not in msg
    (row,) = json.loads((tmp_path / "autotune.json").read_text())["trials"]
    iv = row["intervals"]["metric_drop"]
    assert row["outcome"] == "noise" and iv["low"] <= 0.1 < iv["high"] and iv["n"] == 60
    assert f"the validation split (60 images) cannot tell the drop from noise: give it about {iv['images_needed']:,}" \
        in msg and iv["images_needed"] > 60


def test_the_report_shows_each_drop_with_its_interval_on_val_and_on_test():
    from types import SimpleNamespace

    from edgeslim.components import report as R
    from edgeslim.components import report_render as V
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.recipe import AccuracyGateConfig

    parent = np.ones(500, bool)
    cand = parent.copy()
    cand[:3] = False
    evaluation = _classifier_metrics(parent, cand)
    evaluation["source"].update(size_bytes=900, latency_ms={})
    evaluation["candidate"].update(size_bytes=300, latency_ms={})
    gate = AccuracyGateConfig(max_metric_drop=0.5, confidence=0.9)
    val = C.drop_intervals({"metric_drop": C.top1_drop(parent[:200], cand[:200])}, {"metric_drop": 0.5}, 0.9)
    from edgeslim.components.tasks.classification.evaluate import gate as judge
    verdict = judge(evaluation, gate)
    recipe = SimpleNamespace(digest=lambda: "abc", source="models:/m/1", task=task_from_dict(None), applied_gate=gate)
    rep = R.build_report(recipe=recipe, parent={"name": "m", "version": "1"}, parent_export={}, transform={},
                         quantized={"winner": {"trial": 1, "intervals": val}}, evaluation=evaluation,
                         verdict=verdict, registered={"rejected": True}, onnx_path="/x.onnx")
    (drop,) = rep["confidence"]["drops"]
    assert rep["confidence"]["level"] == 0.9 and drop["val"]["n"] == 200 and drop["test"]["n"] == 500
    assert drop["test"]["low"] < 0.6 < drop["test"]["high"]  # 3 of 500 lost: 0.6 pt, an interval around it
    table = V.format_table(rep)
    assert "val: drop [90% interval]" in table and "test: drop [90% interval]" in table
    assert f"n = 200" in table and f"{drop['val']['images_needed']:,}" in table
    html = V.render_html(rep)
    assert '<table class="drops">' in html and "n = 500" in html
