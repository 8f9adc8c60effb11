"""How far a candidate's drop against its parent can be trusted: intervals over the evaluation images.

A drop measured on n images is one draw: other images of the same kind would give another figure. A gate
that compares that figure with its allowance cannot tell a 0.1-pt loss from the noise of the images. This
module gives each gated drop an interval and judges it against the allowance:

- **top-1** (:func:`top1_drop`): parent and candidate are right or wrong on the same images, and only the
  images where exactly one of them is right move the drop (``parent_only``: the parent right, the candidate
  wrong; ``candidate_only``: the reverse). Its interval is Tango's score interval for a difference of paired
  proportions, from those two counts and n: no resampling, and unlike a bootstrap it stays open when the two
  models disagree on no image (none of 300 still allows a drop of 1.3 pt at 95%).
- **any other metric** (a detector's mAP, :func:`bootstrap_drop`): a paired bootstrap over images: each
  resample draws n images with replacement and both models are scored on the same draw. The draws are seeded
  (:data:`SEED`), so the same records give the same interval. :class:`DetectionRecords` makes mAP@0.5,
  mAP@0.5:0.95, the mean true-positive score and recall recomputable on a resample from per-image figures.

A drop's statistic (what :func:`top1_drop` and :func:`bootstrap_drop` return) is a JSON-able dict that holds no
confidence level: :func:`interval` gives its interval at any level, :func:`judge` its verdict against an
allowance (``within``: the upper bound is inside it; ``worse``: the lower bound is above it; ``noise``: the
interval holds the allowance, so these images cannot decide), and :func:`images_needed` how many images
would decide, if the drop and its spread per image stayed as measured.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.result import GateCheck

SEED = 0  # of the bootstrap's draws: the same records give the same interval
RESAMPLES = 1000  # bootstrap draws per interval
REPORT_LEVEL = 0.95  # the level of the intervals a report shows where the gate sets none
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation, as the detection evaluator uses
_CELLS = 1 << 20  # resamples x detections held at once by the weighted AP (4 MiB of int32 a working array)


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2.0)


# --- top-1: Tango's score interval ---------------------------------------------------------------------------


def top1_drop(parent_correct: Sequence[bool], candidate_correct: Sequence[bool]) -> dict[str, Any]:
    """The top-1 drop's statistic from each image's correctness under the parent and the candidate (paired)."""
    p, c = np.asarray(parent_correct, bool), np.asarray(candidate_correct, bool)
    if p.shape != c.shape:
        raise ValueError(f"correctness of {len(p)} parent and {len(c)} candidate images; they must pair up")
    return {"method": "score", "n": int(len(p)), "parent_only": int((p & ~c).sum()),
            "candidate_only": int((~p & c).sum())}


def _tango_z(delta: float, b: float, c: float, n: float) -> float:
    """Tango's score statistic of ``delta`` = P(parent only) - P(candidate only), given the counts."""
    bb = 2 * n * delta - b * (1 + delta) - c * (1 - delta)
    cc = -c * delta * (1 - delta)
    p21 = (-bb + math.sqrt(max(bb * bb - 8 * n * cc, 0.0))) / (4 * n)  # restricted MLE of P(candidate only)
    var = n * (2 * p21 + delta * (1 - delta))
    if var <= 0:
        return math.copysign(math.inf, b - c - n * delta) if b - c - n * delta else 0.0
    return (b - c - n * delta) / math.sqrt(var)


def _score_interval(b: float, c: float, n: float, level: float) -> tuple[float, float]:
    """The bounds of the paired difference (b - c) / n at ``level`` (fractions): where ``|Z| = z``."""
    z, eps = _z(level), 1e-12

    def root(target: float) -> float:  # Z falls as delta rises: the delta where Z crosses ``target``
        lo, hi = -1.0 + eps, 1.0 - eps
        if _tango_z(lo, b, c, n) <= target:
            return -1.0
        if _tango_z(hi, b, c, n) >= target:
            return 1.0
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _tango_z(mid, b, c, n) > target else (lo, mid)
        return (lo + hi) / 2

    return root(z), root(-z)


# --- any metric: the paired bootstrap ------------------------------------------------------------------------


_BLOCK_COUNTS = 1 << 20  # resample counts drawn and scored at a time: 8 MiB of int64, whatever the split's size


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """How often each of ``n`` images is drawn in each resample: ``(resamples, n)`` counts, seeded (the rows of
    :func:`resample_blocks`, joined)."""
    blocks = list(resample_blocks(n, resamples, seed))
    return np.concatenate(blocks) if blocks else np.zeros((0, n), np.int32)


def resample_blocks(n: int, resamples: int = RESAMPLES, seed: int = SEED):
    """:func:`resample_weights` a block of rows at a time, so that memory stays bounded as ``n`` grows: each
    row is one draw from the same seeded generator, so the rows are the same however they are blocked."""
    rng = np.random.default_rng(seed)
    step = max(1, _BLOCK_COUNTS // max(n, 1))
    for a in range(0, resamples, step):
        rows = min(step, resamples - a)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=rows).astype(np.int32) if n else \
            np.zeros((rows, 0), np.int32)


def bootstrap_drop(drop: float, replicates: np.ndarray, n: int, seed: int = SEED) -> dict[str, Any]:
    """A drop's statistic from its value on all ``n`` images and its value on each paired resample (drawn with
    ``seed``). A candidate that matches its parent on every image has a zero-width interval."""
    reps = np.asarray(replicates, np.float64)
    return {"method": "bootstrap", "n": int(n), "drop": round(float(drop), 6), "seed": seed,
            "replicates": [round(float(v), 5) for v in reps[np.isfinite(reps)]]}


# --- what a statistic says ------------------------------------------------------------------------------------


def _bounds(stat: dict[str, Any], level: float, scale: float = 1.0) -> tuple[float, float, float]:
    """``(drop, low, high)``, unrounded, as ``scale`` times the images would give them with the same drop
    and the same spread per image (the score interval of the scaled counts; a bootstrap interval's distances
    from the drop shrink with the square root of the images)."""
    n = stat["n"] * scale
    if stat["method"] == "score":
        b, c = stat["parent_only"] * scale, stat["candidate_only"] * scale
        lo, hi = _score_interval(b, c, n, level) if n else (-1.0, 1.0)
        return (100.0 * (b - c) / n if n else 0.0), 100.0 * lo, 100.0 * hi
    reps = np.asarray(stat["replicates"], np.float64)
    drop = float(stat["drop"])
    if not len(reps):
        return drop, -math.inf, math.inf
    lo, hi = float(np.quantile(reps, (1 - level) / 2)), float(np.quantile(reps, (1 + level) / 2))
    shrink = math.sqrt(scale)
    return drop, drop - max(drop - lo, 0.0) / shrink, drop + max(hi - drop, 0.0) / shrink


def interval(stat: dict[str, Any], level: float = REPORT_LEVEL) -> dict[str, Any]:
    """``{drop, low, high, level, n, method}`` of a statistic, in its own unit (points for top-1)."""
    drop, lo, hi = _bounds(stat, level)
    return {"drop": round(drop, 4), "low": round(lo, 4), "high": round(hi, 4), "level": level, "n": stat["n"],
            "method": stat["method"]}


def images_needed(stat: dict[str, Any], limit: float, level: float) -> int | None:
    """The fewest images whose interval at ``level`` would leave out ``limit`` (below it, or above it), the drop
    and its spread per image staying as measured; None where no number would (the drop sits on the limit, or
    it would take more than a billion images)."""
    n = stat["n"]
    if not n:
        return None
    drop = _bounds(stat, level)[0]
    if drop == limit:
        return None

    def decides(scale: float) -> bool:
        _, lo, hi = _bounds(stat, level, scale)
        return hi <= limit if drop < limit else lo > limit

    small, big = 1.0 / n, 1e9 / n
    if not decides(big):
        return None
    if decides(small):
        return 1
    while big / small > 1 + 1e-6:  # decides() holds from some scale on: bisect it (geometrically)
        mid = math.sqrt(small * big)
        small, big = (small, mid) if decides(mid) else (mid, big)
    return int(math.ceil(n * big - 1e-6))


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A drop against its allowance at a confidence level: ``outcome`` is ``within`` (the upper bound is
    inside the allowance), ``worse`` (the lower bound is above it) or ``noise`` (the interval holds it);
    ``needed``: the images that would decide (None where no number would, or where it is decided)."""

    outcome: str
    low: float
    high: float
    level: float
    n: int
    needed: int | None

    def words(self, unit: str = "pt") -> str:
        """The interval and what it says, for a gate check's detail."""
        pct = f"{100 * self.level:g}%"
        span = f"{pct} interval [{self.low:.2f}, {self.high:.2f}]" + (f" {unit}" if unit else "")
        if self.outcome == "within":
            return f"{span}, within the allowance"
        if self.outcome == "worse":
            return f"{span}, above the allowance beyond the noise"
        more = (f"a bound that decides needs about {self.needed:,} images" if self.needed else
                "no number of images decides a drop that sits on the allowance")
        return f"not distinguishable from noise at n = {self.n:,}: the {span} holds the allowance; {more}"


def judge(stat: dict[str, Any], allowed: float, level: float) -> Judgement:
    """The drop of ``stat`` against ``allowed`` at ``level``."""
    _, low, high = _bounds(stat, level)
    outcome = "within" if high <= allowed else "worse" if low > allowed else "noise"
    iv = interval(stat, level)
    return Judgement(outcome, iv["low"], iv["high"], level, stat["n"],
                     images_needed(stat, allowed, level) if outcome == "noise" else None)


# The share of answers int8 changes that ``edgeslim init`` assumes when it suggests split sizes: edgeslim's PTQ
# changed the top-1 of none to 1.1% of the test images in the digits bench (a 98.6% and a 92.8% teacher); 2%
# leaves room for harder models.
CHANGED_SHARE = 0.02
_COMMENT_COLUMN = 37  # where the comments of the recipes ``edgeslim init`` writes start


def suggested_images(allowed: float, *, units_per_image: float = 1.0, changed_share: float = CHANGED_SHARE,
                     level: float = REPORT_LEVEL) -> int | None:
    """Images a gate of ``allowed`` points needs for the upper bound of a zero drop to fall within it, where
    the candidate changes ``changed_share`` of the answers (half each way), an image holding
    ``units_per_image`` answers (a detector's boxes): what ``edgeslim init`` suggests as split sizes."""
    half = changed_share * 500.0  # of 1000 answers
    units = images_needed({"method": "score", "n": 1000, "parent_only": half, "candidate_only": half}, allowed, level)
    return None if units is None else int(math.ceil(units / max(units_per_image, 1e-9)))


def split_advice(allowed: float, unit: str, *, val: int | None, test: int | None, units_per_image: float = 1.0,
                 indent: str = "  ") -> str:
    """The commented ``confidence:`` lines of a recipe ``edgeslim init`` writes: the key, and the split sizes
    a bound of ``allowed`` points needs (:func:`suggested_images`) beside the data's."""
    need = suggested_images(allowed, units_per_image=units_per_image)
    have = f"val has {val:,} images, test {test:,}" if val is not None and test is not None else "data not read here"
    per = f"; {units_per_image:.1f} per image" if units_per_image != 1.0 else ""
    key = f"{indent}# confidence: 0.95"
    pad = f"{indent}#" + " " * (_COMMENT_COLUMN - len(indent) - 1)  # the template's comments start at one column
    return (f"{key:<{_COMMENT_COLUMN}}# judge each drop by its 95% interval over the images, not its\n"
            f"{pad}# point estimate: pass when the upper bound is within the allowance;\n"
            f"{pad}# a {allowed:g}-pt bound needs about {need:,} images in val and in test\n"
            f"{pad}# where int8 changes {100 * CHANGED_SHARE:g}% of the {unit}{per} ({have})")


# --- a detector's figures on a resample ------------------------------------------------------------------------


# The recall points that sit a rounding above their hundredth (linspace's 0.35 > 0.35): a recall of exactly k/100
# does not reach point k there, as the evaluator's float comparison has it.
_ABOVE_HUNDREDTH = _RECALL_POINTS > np.arange(len(_RECALL_POINTS)) / (len(_RECALL_POINTS) - 1)


def _points_upto(matched: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """How many recall points are <= each recall ``matched / n_gt`` (integer counts, ``n_gt`` > 0): what
    ``searchsorted(points, recall, "right")`` gives on the float recall, from exact integer arithmetic."""
    steps = len(_RECALL_POINTS) - 1
    scaled = steps * matched.astype(np.int64)
    q = np.minimum(scaled // n_gt, steps)
    return q + 1 - ((q * n_gt == scaled) & _ABOVE_HUNDREDTH[q])


def match_bits(flags: np.ndarray) -> np.ndarray:
    """(D, K) per-threshold match flags as (D,) integers, bit k for threshold k (K at most 16)."""
    flags = np.asarray(flags, bool)
    if flags.shape[1] > 16:
        raise ValueError(f"records hold at most 16 IoU thresholds; got {flags.shape[1]}")
    return (flags.astype(np.uint16) << np.arange(flags.shape[1], dtype=np.uint16)).sum(1, dtype=np.uint16)


@dataclasses.dataclass(frozen=True)
class DetectionRecords:
    """One detector's per-image figures on ``n`` images: enough to score it on any resample of them.

    Matching is within an image, so each detection keeps whether it is a true positive whatever else is
    drawn; a resample only weights images. Detections are ordered by image, then by class, then by score
    (highest first, ties in the decoder's order), as the detection evaluator matches them.

    Attributes:
        n: images.
        det_image: per detection, its image (D,).
        det_class: per detection, its class (D,).
        det_score: per detection, its score (D,).
        det_tp: per detection, whether it matched a ground-truth box at each IoU threshold: (D, K) flags, kept
            as (D,) bits (bit k: threshold k; :meth:`matches` gives the flags back).
        gt: ground-truth boxes per image and class (n, C).
        score_threshold: the deployment threshold (recall is counted at it).
        thresholds: K, where ``det_tp`` is given as bits.
    """

    n: int
    det_image: np.ndarray
    det_class: np.ndarray
    det_score: np.ndarray
    det_tp: np.ndarray
    gt: np.ndarray
    score_threshold: float
    thresholds: int = 0
    _resampled: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tp = np.asarray(self.det_tp)
        if tp.ndim == 2:  # flags: a detection's K flags become the bits of one integer
            object.__setattr__(self, "det_tp", match_bits(tp))
            object.__setattr__(self, "thresholds", tp.shape[1])
        elif self.thresholds <= 0:
            raise ValueError("records given match bits need their number of IoU thresholds (thresholds=K)")

    def matches(self, sel=slice(None)) -> np.ndarray:
        """Whether each selected detection matched at each IoU threshold: (len, K) flags."""
        return (self.det_tp[sel, None] >> np.arange(self.thresholds, dtype=np.uint16)) & 1 == 1

    def resampled(self, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
        """:meth:`scores` on the seeded resamples of :func:`resample_weights`, kept: a search judges every
        trial against the same fp32 records."""
        if (resamples, seed) not in self._resampled:
            self._resampled[(resamples, seed)] = self.scores_resampled(resamples, seed)
        return self._resampled[(resamples, seed)]

    def scores_resampled(self, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
        """:meth:`scores` on the seeded resamples, drawn and scored a block at a time (:func:`resample_blocks`)."""
        parts = [self.scores(w) for w in resample_blocks(self.n, resamples, seed)]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]} if parts else \
            {k: np.zeros(0) for k in ("map50", "map50_95", "mean_tp_score", "recall")}

    def head(self, k: int) -> "DetectionRecords":
        """The records of the first ``k`` images."""
        keep = self.det_image < k
        return dataclasses.replace(self, n=min(k, self.n), det_image=self.det_image[keep],
                                   det_class=self.det_class[keep], det_score=self.det_score[keep],
                                   det_tp=self.det_tp[keep], gt=self.gt[:k])

    def scores(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """mAP@0.5 and mAP@0.5:0.95 (points), the mean true-positive score and recall at the threshold (points)
        on each resample: ``weights`` (R, n) says how often each image is drawn."""
        w = np.asarray(weights, np.int32)  # draws of an image: at most n
        r, (classes, k_thr) = len(w), (self.gt.shape[1], self.thresholds)
        ap = np.full((r, classes, k_thr), np.nan)
        for c in range(classes):
            n_gt = w @ self.gt[:, c]
            ap[:, c, :] = np.where((n_gt > 0)[:, None], 0.0, np.nan)
            sel = np.flatnonzero(self.det_class == c)
            sel = sel[np.argsort(-self.det_score[sel], kind="stable")]
            # Only a true positive moves recall, and precision peaks at one: the curve is read at the detections
            # that match at some threshold, each with the weight of every detection ranked above it.
            hits = np.flatnonzero(self.det_tp[sel])
            if not len(hits):
                continue
            sel = sel[:hits[-1] + 1]  # the detections ranked below the last hit move neither recall nor precision
            img, tp = self.det_image[sel], self.matches(sel[hits]).astype(np.int32)
            step = max(1, _CELLS // len(sel))
            for a in range(0, r, step):
                wd = w[a:a + step][:, img]  # (rows, D): each detection weighted by its image's draws
                cdet, wh = np.cumsum(wd, axis=1, dtype=np.int32)[:, hits], wd[:, hits]
                ngt = n_gt[a:a + step][:, None]
                counted = ngt[:, 0] > 0
                for k in range(k_thr):
                    ctp = np.cumsum(wh * tp[:, k], axis=1, dtype=np.int32)
                    precision = ctp / np.maximum(cdet, 1)
                    env = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
                    # each recall point takes the envelope at the first detection whose recall reaches it
                    took = np.diff(_points_upto(ctp, np.maximum(ngt, 1)), axis=1, prepend=0)
                    ap[a:a + step, c, k] = np.where(counted, (env * took).sum(1) / len(_RECALL_POINTS), np.nan)
        valid = ~np.isnan(ap[:, :, 0])
        counted = valid.sum(1)
        with np.errstate(invalid="ignore"):
            map50 = np.where(counted > 0, np.nansum(ap[:, :, 0], 1) / np.maximum(counted, 1), 0.0) * 100
            map50_95 = np.where(counted > 0, np.nansum(ap, (1, 2)) / np.maximum(counted * k_thr, 1), 0.0) * 100
        tp50 = (self.det_tp & 1) == 1
        at = tp50 & (self.det_score >= self.score_threshold)
        # per image: the true positives' score sum, the true positives, those at the threshold
        per_image = np.stack([np.bincount(self.det_image, weights=np.where(tp50, self.det_score, 0.0),
                                          minlength=self.n),
                              np.bincount(self.det_image[tp50], minlength=self.n).astype(np.float64),
                              np.bincount(self.det_image[at], minlength=self.n).astype(np.float64)], 1)
        sums, gts = w @ per_image, w @ self.gt.sum(1, dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_tp = np.where(sums[:, 1] > 0, sums[:, 0] / np.maximum(sums[:, 1], 1), 0.0)
            recall = np.where(gts > 0, 100.0 * sums[:, 2] / np.maximum(gts, 1), 0.0)
        return {"map50": map50, "map50_95": map50_95, "mean_tp_score": mean_tp, "recall": recall}


# The detection gate's drops, by the name of its check, and the figure each is the drop of.
DETECTION_DROPS = {"map50_drop": "map50", "map50_95_drop": "map50_95", "mean_tp_score_drop": "mean_tp_score",
                   "recall_drop": "recall"}


def detection_drops(parent: DetectionRecords, candidate: DetectionRecords, *, resamples: int = RESAMPLES,
                    seed: int = SEED) -> dict[str, dict[str, Any]]:
    """The statistic of each detection drop (:data:`DETECTION_DROPS`): parent minus candidate on the same
    images, on all of them and on each of ``resamples`` paired resamples (seeded)."""
    if parent.n != candidate.n:
        raise ValueError(f"records of {parent.n} parent and {candidate.n} candidate images; they must pair up")
    ones = np.ones((1, parent.n), np.int32)
    p, c = parent.resampled(resamples, seed), candidate.scores_resampled(resamples, seed)
    p1, c1 = parent.scores(ones), candidate.scores(ones)
    return {name: bootstrap_drop(p1[key][0] - c1[key][0], p[key] - c[key], parent.n, seed)
            for name, key in DETECTION_DROPS.items()}


def drop_check(name: str, drop: float, allowed: float, detail: str, *, stat: dict[str, Any] | None,
               level: float | None, unit: str = "pt") -> GateCheck:
    """A gate's check of one drop. Without a ``level`` (or without a statistic: an evaluation that kept no
    per-image records) it passes when the measured ``drop`` is within ``allowed``; with one, when the drop's
    upper bound is, and the check holds its interval and outcome (:func:`judge`)."""
    if level is None or stat is None:
        return GateCheck(name, drop, allowed, drop <= allowed, detail)
    j = judge(stat, allowed, level)
    words = f"{j.words(unit)} ({detail})" if j.outcome == "noise" else f"{detail}; {j.words(unit)}"
    return GateCheck(name, drop, allowed, j.outcome == "within", words, low=j.low, high=j.high, level=level,
                     outcome=j.outcome)


def drop_intervals(stats: dict[str, dict[str, Any]], allowed: dict[str, float], level: float | None
                   ) -> dict[str, dict[str, Any]]:
    """Each drop's interval at ``level`` (the report's 95% where the gate sets none), its allowance, and the
    images that would decide it against the allowance (:func:`images_needed`): what a search row and the
    report show."""
    at = level or REPORT_LEVEL
    return {name: {**interval(stat, at), "allowed": allowed[name], "images_needed": images_needed(stat, allowed[name], at)}
            for name, stat in stats.items() if name in allowed}
