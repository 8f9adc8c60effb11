"""Accuracy-aware quantization: the cheapest int8 candidate that passes the gate.

One search, :func:`search`, for every task. Trials, in order, stopping at the first
that passes:

1. PTQ with each configured calibrator (each calibrates once; every later trial
   with that calibrator reuses its ranges, since keeping nodes in float changes no
   tensor's range), in each of ``config.placements``: with ``placement: auto``, Q/DQ
   on every op, then on the weighted layers' inputs only (TensorRT's placement). With
   ``select: best`` every one of these trials is judged, and the passing one the
   strategy ranks first (:meth:`Strategy.choice_key`) wins;
2. the best calibrator and placement with the most damaging node groups kept in float,
   one more group per trial, up to ``max_float_layers``;
3. QAT from the best candidate so far.

A strategy may screen a trial on a part of the validation split first
(:meth:`Strategy.screen`; the detector's does when a quarter of val holds 128 images): one that
clearly fails there is not judged on the whole split, so a search costs a bounded number
of passes over val, whatever the number of layers (the fallback's ranking takes one pass
over a few images, :mod:`edgeslim.components.tasks.detection.search`).

What differs between tasks is a :class:`Strategy`: how a candidate is judged and
ranked, which node groups the fallback ranks, how QAT runs and how the outcome is
worded. Each task's strategy lives in its task package (the classifier's in
:mod:`edgeslim.components.tasks.classification.search`, the detector's in
:mod:`edgeslim.components.tasks.detection.search`).

With a gate that sets a ``confidence`` (:mod:`edgeslim.components.common.confidence`), a trial is judged by
its drops' intervals over the validation images: refused only when it is worse beyond the noise (a screen
refuses only then too), passed only when it is within the allowance beyond the noise; an undecided trial
ranks above a refused one, and when none passes the refusal says how many validation images would decide.

Every choice is made on the **validation** split: trials are judged and ranked there
and so is the fallback's ranking. The test split only reports: the pipeline's
evaluate task judges the winner on it afterwards (``autotune.json`` says
``"chosen_on": "val"``). Every trial is a row of ``autotune.json`` (and of the
report) and, when an MLflow run is given or active, a child run of it; that run then carries the
chosen trial's figures as its own metrics and params.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, GateRejected, SourceError
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, QATQuantizeConfig

CHOSEN_ON = "val"


class _Tracker:
    """Child runs under a parent MLflow run, or nothing when there is no run."""

    def __init__(self, tracking_uri: str | None, parent_run_id: str | None):
        self.client = None
        self.parent = None
        run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID")
        mlflow = sys.modules.get("mlflow")  # never imported: no run can be active
        if not run_id and mlflow is not None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active else None
            tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        if not run_id:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()
        self.parent = self.client.get_run(run_id)

    def trial(self, row: dict[str, Any], fields: tuple[str, ...]) -> str | None:
        if not self.client:
            return None
        run = self.client.create_run(
            self.parent.info.experiment_id,
            run_name=f"trial-{row['trial']}-{row['kind']}",
            tags={"mlflow.parentRunId": self.parent.info.run_id, "edgeslim.trial": str(row["trial"]),
                  "edgeslim.trial_kind": row["kind"], "edgeslim.gate_passed": str(row["passed"]),
                  "edgeslim.chosen_on": CHOSEN_ON},
        )
        rid = run.info.run_id
        self.client.log_param(rid, "calibrator", row["calibrator"])
        self.client.log_param(rid, "float_layers", (",".join(row["float_layers"]) or "-")[:5000])
        self.client.log_param(rid, "kind", row["kind"])
        self.client.log_param(rid, "placement", row["placement"])
        for k, v in {**{k: row.get(k) for k in (*fields, "size_bytes")}, **bounds(row)}.items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                self.client.log_metric(rid, k, float(v))
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def outcome(self, winner: dict[str, Any] | None, fields: tuple[str, ...], trials: int) -> None:
        """The search's outcome on the parent run, which stands for the search: ``trials``, and the chosen
        trial's number (``winning_trial``), judged ``fields``, ``size_bytes`` and count of nodes kept in float
        (``float_layers``) as metrics, named as on its trial's child run; its ``calibrator``, ``kind`` and
        ``placement`` as params; ``edgeslim.gate_passed`` as a tag."""
        if not self.client:
            return
        from mlflow.entities import Metric, Param, RunTag

        values: dict[str, Any] = {"trials": trials}
        params: list[Param] = []
        if winner is not None:
            values.update({"winning_trial": winner["trial"], **{k: winner.get(k) for k in (*fields, "size_bytes")},
                           "float_layers": len(winner["float_layers"]), **bounds(winner)})
            params = [Param(k, str(winner[k])) for k in ("calibrator", "kind", "placement")]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
        self.client.log_batch(self.parent.info.run_id, metrics=metrics, params=params,
                              tags=[RunTag("edgeslim.gate_passed", str(winner is not None))])

    def ranking(self, strategy: Strategy) -> None:
        if self.client:
            strategy.log_ranking(self.client, self.parent.info.run_id)


def bounds(row: dict[str, Any]) -> dict[str, float]:
    """A judged row's drop intervals as MLflow metrics: ``<drop>_low`` and ``<drop>_high``."""
    return {f"{name}_{end}": iv[end] for name, iv in (row.get("intervals") or {}).items() for end in ("low", "high")}


def undecided(row: dict[str, Any]) -> str:
    """What to change first when the best trial's verdict was "not distinguishable from noise": the images that
    would decide each drop whose interval holds its allowance (empty where the verdict was decided)."""
    if row.get("outcome") != "noise":
        return ""
    held = [iv for iv in (row.get("intervals") or {}).values() if iv["low"] <= iv["allowed"] < iv["high"]]
    n = held[0]["n"] if held else "its"
    need = max((iv["images_needed"] for iv in held if iv.get("images_needed")), default=None)
    more = f"give it about {need:,} images, " if need else ""
    return f"the validation split ({n} images) cannot tell the drop from noise: {more}or "


class Strategy(abc.ABC):
    """What one task's search needs; :func:`search` does the rest.

    A strategy judges a candidate on the validation split into a row, orders rows,
    ranks the node groups the fallback keeps in float, runs QAT, and words the
    outcome. It holds what it measured (the reference, the ranking table) for the
    report.

    Attributes:
        task: the task's kind (lineage, and the refusal of a task without QAT).
        candidate: what a trial produces, in the refusal ("candidate", "detector candidate").
        gate_name: the gate, in reasons and the refusal.
        group_noun: what a fallback group is, in the reason ("layer(s)", "head(s) producing").
        qat_note: how QAT trains, in the reason.
        fields: the judged row fields logged as MLflow metrics.
        table_key: where the fallback's ranking table goes in ``autotune.json`` and the metrics.
        table: that table (``None`` or empty until :meth:`rank` ran).
        qat_skipped: why :meth:`qat` could not run (one line), or empty.
        qat_settings: ``QATQuantizeConfig`` fields the search's QAT trial sets beyond its own config's.
    """

    task = ""
    candidate = "candidate"
    gate_name = "gate"
    group_noun = "layer(s)"
    qat_note = ""
    fields: tuple[str, ...] = ()
    table_key = "sensitivity"
    table: Any = None
    qat_skipped = ""
    qat_settings: dict[str, Any] = {}  # the search's QAT trial's settings beyond the search config's

    @abc.abstractmethod
    def reference(self, data: Splits) -> dict[str, Any]:
        """Measure the reference on the validation split; its figures for ``autotune.json``."""

    @abc.abstractmethod
    def judge(self, candidate: str | Path, data: Splits) -> dict[str, Any]:
        """Metric fields of ``candidate`` on the validation split, ``passed``, ``outcome`` (``passed``,
        ``refused``, or ``noise``: the gate's confidence interval could not decide), ``gate`` (the summary)
        and ``intervals`` (per gated drop, :func:`~edgeslim.components.common.confidence.drop_intervals`)."""

    def screen(self, candidate: str | Path, data: Splits) -> dict[str, Any] | None:
        """Judge ``candidate`` on a part of the validation split first (a row, with ``screened_on``: how
        many images): a trial refused there (``outcome``) is not judged on the whole split. None (the
        default): every trial is judged on the whole split."""
        return None

    @abc.abstractmethod
    def key(self, row: dict[str, Any]) -> tuple:
        """Sort key of a judged row: the larger, the better."""

    def choice_key(self, row: dict[str, Any]) -> tuple:
        """Sort key among trials that all passed (``select: best``): the larger, the better; :meth:`key` by
        default."""
        return self.key(row)

    @abc.abstractmethod
    def figures(self, row: dict[str, Any]) -> str:
        """A row's judged figures against the reference, for the progress line and the refusal."""

    @abc.abstractmethod
    def rank(self, fp32_onnx: str | Path, config: AccuracyAwareQuantizeConfig, *, calibrator: str,
             ranges: dict[str, float], data: Splits, out_dir: Path, pinned: list[str]) -> list[dict[str, Any]]:
        """Node groups to keep in float, most damaging first: ``[{"label", "nodes"}]``; sets ``table``.
        ``ranges`` are ``calibrator``'s, for ``fp32_onnx``; ``pinned`` nodes are float in every trial."""

    def float_from_start(self, fp32_onnx: str | Path) -> list[dict[str, Any]]:
        """Node groups every trial keeps in float from the first one on (``[{"label", "nodes"}]``), found from
        the graph, never by name; the fallback ranks the others. None by default."""
        return []

    def log_ranking(self, client, run_id: str) -> None:
        """Log the ranking's files to the MLflow run ``run_id`` (nothing by default)."""

    def train_qat(self, fp32_onnx: str | Path, config: QATQuantizeConfig, *, data: Splits, out_dir: Path,
                  progress=None) -> StageResult:
        """``method: qat`` for this task: the one QAT chain (:func:`.qat.qat_chain`) with the task's
        fake-quant twin and loss, from ``self.model`` (the torch model ``fp32_onnx`` was exported from).

        Raises:
            ConfigError: the task has no QAT, or there is no torch model.
            SourceError: the model cannot be fake-quantized as its Q/DQ ONNX is.
        """
        raise ConfigError(f"quantize(qat): the {self.task or 'given'} task has no QAT; use method ptq or auto")

    def qat_row(self, res: StageResult) -> dict[str, Any]:
        """The QAT result's own figures, beside the judged ones in its trial row."""
        return {}

    def qat(self, fp32_onnx: str | Path, config: AccuracyAwareQuantizeConfig, *, data: Splits, out_dir: Path,
            calibrator: str, float_layers: list[str]) -> tuple[StageResult, dict[str, Any]] | None:
        """The search's QAT trial from ``calibrator`` and ``float_layers`` (:meth:`train_qat`): the result
        and extra row fields; ``None`` when it cannot run (``qat_skipped`` says why): the task has no QAT
        (its strategy keeps the base :meth:`train_qat`), or no torch model was given."""
        if type(self).train_qat is Strategy.train_qat:
            self.qat_skipped = f"the {self.task or 'given'} task has no QAT"
            return None
        if getattr(self, "model", None) is None:
            self.qat_skipped = "no torch model was given"
            return None
        try:
            res = self.train_qat(fp32_onnx, config.qat_config(calibrator, float_layers, **self.qat_settings),
                                 data=data, out_dir=out_dir)
        except SourceError as exc:  # not traceable, or its ONNX has tensors torch does not compute
            self.qat_skipped = str(exc)
            return None
        return res, self.qat_row(res)

    def reason(self, row: dict[str, Any], groups: list[dict[str, Any]], config: AccuracyAwareQuantizeConfig) -> str:
        """Why ``row`` (after keeping ``groups`` in float) won."""
        t, cal, gate, name = row["trial"], row["calibrator"], row["gate"], self.gate_name
        where = {"weighted": ", Q/DQ on the weighted layers' inputs only"}.get(row["placement"], "")
        if row["kind"] == "ptq":
            first = " first" if config.select == "first" else ""
            return f"trial {t}: PTQ with the {cal} calibrator{where} passed the {name}{first} ({gate})"
        if row["kind"] == "fallback":
            return (f"trial {t}: PTQ ({cal}{where}) failed the {name}; keeping the {len(groups)} most sensitive "
                    f"{self.group_noun} {[g['label'] for g in groups]} in float passed ({gate})")
        return (f"trial {t}: PTQ ({cal}) and float fallback failed the {name}; {config.qat_epochs} epoch(s) of "
                f"QAT{self.qat_note} passed ({gate})")

    @abc.abstractmethod
    def fix(self, config: AccuracyAwareQuantizeConfig, qat_ran: bool) -> str:
        """What to change when no trial passed."""

    def result_metrics(self, row: dict[str, Any], res: StageResult) -> dict[str, Any]:
        """Extra metrics of the search's result, from the winning trial."""
        return {}


def search(fp32_onnx: str | Path, config: AccuracyAwareQuantizeConfig, *, strategy: Strategy, data: Splits,
           out_dir: str | Path, tracking_uri: str | None = None, parent_run_id: str | None = None,
           progress: Callable[[str], None] | None = None) -> StageResult:
    """The first int8 candidate of ``fp32_onnx`` that passes ``strategy``'s gate on the validation
    split: PTQ per calibrator, then float fallback of ranked node groups, then QAT.

    Args:
        fp32_onnx: the model to quantize.
        config: calibrators, pinned ``float_layers``, fallback limit, QAT settings.
        strategy: judges, ranks and words for the task (what a task's ``search_strategy`` returns).
        data: calibration from train; every judgement and ranking on val; test untouched.
        out_dir: ``ptq-<calibrator>/``, ``fallback-<k>/``, ``qat/``, the ranking's files,
            ``autotune.json`` and the winner's ``model.int8.onnx``.
        tracking_uri: MLflow server of the parent run (default: the active/env one).
        parent_run_id: every trial becomes a child run of it, and it gets the chosen trial's figures
            (default: ``$MLFLOW_RUN_ID`` or the active run; no MLflow logging without one).
        progress: called with one line per trial.

    Returns:
        StageResult whose model is the winning Q/DQ ONNX; metrics hold ``trials`` (one row
        each), ``winner``, ``reason``, the ranking table and ``strategy.result_metrics``.

    Raises:
        GateRejected: no trial passed; the one-line message names the best trial and what to change.
    """
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = _Tracker(tracking_uri, parent_run_id)
    # Where the search's time goes (seconds): the reference, calibration, writing the candidates, judging
    # them on val, ranking the fallback's groups; autotune.json and the metrics carry it as "cost".
    cost = dict.fromkeys(("reference_s", "calibration_s", "quantize_s", "judge_s", "ranking_s"), 0.0)
    reference = strategy.reference(data)
    cost["reference_s"] = time.perf_counter() - start
    trials: list[dict[str, Any]] = []
    results: dict[int, StageResult] = {}

    def record(kind: str, res: StageResult, cal: str, float_layers: list[str], seconds: float,
               extra: dict | None = None) -> dict[str, Any]:
        path = Path(res.model)
        t = time.perf_counter()
        # A trial that clearly fails on a part of val is not judged on all of it (its row has the part's figures).
        screened = strategy.screen(path, data)
        refused = screened is not None and screened.get("outcome", "refused" if not screened["passed"] else "") == "refused"
        judged = screened if refused else {
            **strategy.judge(path, data), **({"screen": screened} if screened else {})}
        cost["quantize_s"] += seconds
        cost["judge_s"] += time.perf_counter() - t
        row = {"trial": len(trials) + 1, "kind": kind, "calibrator": cal,
               "float_layers": list(float_layers), "model": str(path),
               "size_bytes": path.stat().st_size, "seconds": round(seconds, 2),
               "judge_seconds": round(time.perf_counter() - t, 2), **judged, **(extra or {})}
        row["mlflow_run_id"] = tracker.trial(row, strategy.fields)
        trials.append(row)
        results[row["trial"]] = res
        if progress:
            progress(f"trial {row['trial']} {kind} {cal} {row['placement']} float={len(row['float_layers'])}: "
                     f"{strategy.figures(row)} "
                     f"({'pass' if row['passed'] else 'fail'})")
        return row

    def costs() -> dict[str, float]:
        return {**{k: round(v, 2) for k, v in cost.items()}, "total_s": round(time.perf_counter() - start, 2)}

    def report(winner: int | None, reason: str) -> None:
        (out_dir / "autotune.json").write_text(json.dumps(
            {"chosen_on": CHOSEN_ON, "trials": trials, "winner": winner, "reason": reason, **reference,
             strategy.table_key: strategy.table, "cost": costs()}, indent=1, default=str))

    def finish(row: dict[str, Any], groups: list[dict[str, Any]], note: str = "") -> StageResult:
        reason = strategy.reason(row, groups, config) + note + (
            f"; float in every trial: {[g['label'] for g in start_float]}" if start_float else "")
        report(row["trial"], reason)
        tracker.outcome(row, strategy.fields, len(trials))
        final = out_dir / "model.int8.onnx"
        final.write_bytes(Path(row["model"]).read_bytes())
        metrics = {"size_bytes": final.stat().st_size, "winner": row, "reason": reason, "trials": trials,
                   "chosen_on": CHOSEN_ON, strategy.table_key: strategy.table, "cost": costs(),
                   **strategy.result_metrics(row, results[row["trial"]])}
        lineage = {"stage": "quantize", "method": "auto", "task": strategy.task, "config": config.to_json_dict(),
                   "winning_trial": row["trial"], "chosen_on": CHOSEN_ON, "calibration_split": "train",
                   "data_digest": data.digest()}
        return StageResult(final, metrics, lineage, time.perf_counter() - start)

    # 1. PTQ with each calibrator (plus the recipe's pinned float layers and the strategy's groups float from
    # the start), calibrated once.
    start_float = strategy.float_from_start(fp32_onnx)
    if start_float:
        config = dataclasses.replace(config, float_layers=list(dict.fromkeys(
            config.float_layers + [n for g in start_float for n in g["nodes"]])))
    ranges: dict[str, dict[str, float]] = {}
    pinned: list[str] = []
    placements = config.placements
    for cal in config.calibrators:
        t = time.perf_counter()
        ranges[cal] = calibrate_onnx(fp32_onnx, config.ptq(cal), data)  # the same whatever the placement
        cost["calibration_s"] += time.perf_counter() - t
        for place in placements:  # a second placement reuses the ranges: one more quantize and judgement
            t = time.perf_counter()  # a trial's seconds: writing its model (calibration is in cost)
            res = quantize(fp32_onnx, config.ptq(cal, placement=place), data=data,
                           out_dir=out_dir / (f"ptq-{cal}" if place == placements[0] else f"ptq-{cal}-{place}"),
                           ranges=ranges[cal])
            pinned = list(res.metrics["float_layers"])  # the recipe's patterns, resolved to nodes
            row = record("ptq", res, cal, pinned, time.perf_counter() - t, {"placement": place})
            if row["passed"] and config.select == "first":
                return finish(row, [])
    passed = [r for r in trials if r["passed"]]
    if passed:  # select: best -- the passing PTQ trial the strategy ranks first on val
        won = max(passed, key=strategy.choice_key)
        return finish(won, [], f"; ranked first on val of the {len(passed)} PTQ trial(s) that passed "
                               f"({', '.join(str(r['trial']) for r in passed)})")
    best = max(trials, key=strategy.key)
    cal = best["calibrator"]
    # The fallback and QAT keep the best trial's placement.
    config = dataclasses.replace(config, placement=best["placement"])

    # 2. Keep the most damaging node groups in float, one more per trial.
    if config.max_float_layers > 0:
        t = time.perf_counter()
        groups = strategy.rank(fp32_onnx, config, calibrator=cal, ranges=ranges[cal], data=data,
                               out_dir=out_dir, pinned=pinned)
        cost["ranking_s"] += time.perf_counter() - t
        tracker.ranking(strategy)
        for k in range(1, min(config.max_float_layers, len(groups)) + 1):
            keep = [n for g in groups[:k] for n in g["nodes"]]
            t = time.perf_counter()
            res = quantize(fp32_onnx, config.ptq(cal, keep), data=data, out_dir=out_dir / f"fallback-{k}",
                           ranges=ranges[cal])
            row = record("fallback", res, cal, res.metrics["float_layers"], time.perf_counter() - t,
                         {"placement": config.placement})
            if row["passed"]:
                return finish(row, groups[:k])

    # 3. QAT from the best candidate so far.
    qat_ran = False
    if config.qat:
        best = max(trials, key=strategy.key)
        t = time.perf_counter()
        done = strategy.qat(fp32_onnx, config, data=data, out_dir=out_dir / "qat", calibrator=best["calibrator"],
                            float_layers=list(best["float_layers"]))
        if done is None and strategy.qat_skipped and progress:
            progress(f"QAT skipped: {strategy.qat_skipped}")
        if done is not None:
            qat_ran = True
            res, extra = done
            row = record("qat", res, best["calibrator"], best["float_layers"], time.perf_counter() - t,
                         {"placement": res.lineage["placement"], **extra})
            if row["passed"]:
                return finish(row, [])

    best = max(trials, key=strategy.key)
    msg = (f"quantize(auto): no {strategy.candidate} passed the {strategy.gate_name} after {len(trials)} "
           f"trial(s); best was trial {best['trial']} ({best['kind']}, {best['calibrator']}, "
           f"{strategy.figures(best)}: {best['gate']}); {undecided(best)}{strategy.fix(config, qat_ran)}")
    report(None, msg)
    tracker.outcome(None, strategy.fields, len(trials))
    raise GateRejected(msg)
