"""The one bench harness of ``edgeslim bench``: every row of a workload side by side, in one
process, on the same data.

A workload (:class:`Workload`) says how its teacher and data are made, which rows it builds (the
fp32 teacher first: every ratio and drop is against it) and how a row's accuracy is measured. The
harness measures what every row shares, in the same way for every workload: size, MACs, ONNX
Runtime latency at batch 1 and 32 (median of ``--repeats`` runs, ``--threads`` intra-op threads),
what building the row cost (its stage's wall time and peak RSS: ``stage_s``, ``stage_peak_rss_mb``),
the peak RSS of the process so far, and the ratios and drops against the first row.

The workloads and the command are in :mod:`.bench`.

Accuracy and fidelity are measured in Q/DQ semantics (what TensorRT's int8 math approximates, see
docs/design.md); latency is ONNX Runtime on this CPU with its default optimizations. CPU int8 latency is
printed as measured: on x86 without VNNI it is no guide to int8 speed on a Jetson.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class Context:
    """What a workload's rows share: its settings, and what :meth:`Workload.prepare` made."""

    workdir: Path
    seed: int = 0
    quick: bool = False
    log: Callable[[str], None] = print
    data: Any = None
    teacher: Any = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RowSpec:
    """One row a workload built: its ONNX model (or why there is none), MACs and extra columns."""

    name: str
    path: Path | None
    macs: int = 0
    int8: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    failed: str = ""


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    header: str
    width: int
    fmt: str  # format spec of a value, e.g. ".2f"


class Workload:
    """A benchmark workload. Subclasses set the class attributes and implement the methods."""

    name = ""
    columns: tuple[Column, ...] = ()  # the accuracy columns, in table order
    drops: dict[str, tuple[str, int]] = {}  # drop column -> (accuracy column, decimals), first row minus this
    targets_apply = True
    latency_batches: tuple[int, ...] = (1, 32)  # batch sizes timed (a 640-pixel detector: batch 1 only)

    def prepare(self, ctx: Context) -> None:
        """Make the data and the teacher (``ctx.data``, ``ctx.teacher``)."""
        raise NotImplementedError

    def rows(self, ctx: Context) -> Iterator[RowSpec]:
        """The rows, the fp32 teacher first."""
        raise NotImplementedError

    def accuracy(self, ctx: Context, spec: RowSpec, reference: Any) -> tuple[dict[str, Any], Any]:
        """A row's accuracy columns, and what later rows compare against (``reference`` is the first
        row's; None while measuring the first row)."""
        raise NotImplementedError

    def targets(self, rows: list[dict[str, Any]], ctx: Context) -> dict[str, dict[str, Any]]:
        return {}

    def summary(self, ctx: Context) -> dict[str, Any]:
        """Workload facts for the JSON (recipe, test samples, ...)."""
        return {}

    def notes(self, result: dict[str, Any]) -> list[str]:
        """Lines printed under the table."""
        return []


def top1_drop_interval(reference_logits, logits, labels, level: float = 0.95) -> dict[str, float]:
    """A classifier row's top-1 drop against the first row's, as a paired interval over the test images
    (:func:`~edgeslim.components.common.confidence.top1_drop`): ``top1_drop_low`` and ``top1_drop_high``."""
    import numpy as np

    from edgeslim.components.common.confidence import interval, top1_drop

    y = np.asarray(labels)
    iv = interval(top1_drop(np.asarray(reference_logits).argmax(1) == y, np.asarray(logits).argmax(1) == y), level)
    return {"top1_drop_low": iv["low"], "top1_drop_high": iv["high"]}


# The accuracy columns of a classifier's paired top-1 drop interval, and the line that explains them.
INTERVAL_COLUMNS = (Column("top1_drop_low", "d-lo95", 7, ".2f"), Column("top1_drop_high", "d-hi95", 7, ".2f"))
INTERVAL_NOTE = ("d-lo95, d-hi95: the 95% interval of the top-1 drop against the first row, paired over the test "
                 "images (Tango's score interval: only the images where exactly one of the two is right move it).")


def peak_rss_mb() -> float:
    """This process's peak resident set since it started, or since the last :func:`reset_peak_rss`
    (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: ``/proc/self/clear_refs``), so that :func:`peak_rss_mb` is one
    stage's; False where that cannot be done (then a stage's peak is the process's so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _Stage:
    """Wall time and peak RSS from start (or :meth:`restart`) to :meth:`stop`; the process's own
    peak is the highest of every stage's."""

    def __init__(self) -> None:
        self.process_peak = peak_rss_mb()
        self.restart()

    def restart(self) -> None:
        self.process_peak = max(self.process_peak, peak_rss_mb())
        self.per_stage = reset_peak_rss()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        peak = peak_rss_mb()
        self.process_peak = max(self.process_peak, peak)
        return {"stage_s": round(time.perf_counter() - self.t0, 2), "stage_peak_rss_mb": peak}


def _common(spec: RowSpec, data, threads: int, repeats: int, batches: tuple[int, ...]) -> dict[str, Any]:
    from edgeslim.components.common.onnx_runtime import latency_ms, make_session

    fast = make_session(spec.path, basic=False, threads=threads)
    return {"size_bytes": spec.path.stat().st_size, "macs": int(spec.macs),
            **{f"latency_ms_b{b}": latency_ms(fast, data.x_test, b, 20 if b == 1 else 10, repeats) for b in batches}}


def run_workload(wl: Workload, *, workdir: str | Path, threads: int = 1, repeats: int = 50,
                 seed: int = 0, quick: bool = False, log=print) -> dict[str, Any]:
    """Prepare the workload, build and measure every row; returns ``{rows, targets, ...}``."""
    ctx = Context(workdir=Path(workdir), seed=seed, quick=quick, log=log)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stage = _Stage()
    wl.prepare(ctx)
    prepared = stage.stop()
    rows: list[dict[str, Any]] = []
    reference = None
    stage.restart()
    for spec in wl.rows(ctx):  # the generator's work up to each yield is that row's stage
        cost = stage.stop()
        if spec.failed or spec.path is None:
            log(f"  {spec.name}: no model ({spec.failed})")
            rows.append({"row": spec.name, "failed": spec.failed or "no model", **cost, **spec.extra})
            stage.restart()
            continue
        acc, state = wl.accuracy(ctx, spec, reference)
        if reference is None:
            reference = state
        row = {"row": spec.name, "model": str(spec.path), "int8": spec.int8, **acc,
               **_common(spec, ctx.data, threads, repeats, wl.latency_batches), **spec.extra, **cost}
        stage.restart()
        row["peak_rss_mb"] = stage.process_peak
        log(f"  {spec.name}: " + ", ".join(f"{c.header} {row[c.key]:{c.fmt}}" for c in wl.columns
                                           if isinstance(row.get(c.key), (int, float))))
        rows.append(row)
    ref = rows[0]
    for r in rows:
        if "failed" in r:
            continue
        for drop, (col, ndigits) in wl.drops.items():
            r[drop] = round(ref[col] - r[col], ndigits)
        r["size_ratio"] = round(ref["size_bytes"] / r["size_bytes"], 2)
        r["macs_ratio"] = round(ref["macs"] / max(r["macs"], 1), 2)
        for b in wl.latency_batches:
            r[f"latency_b{b}_ratio"] = round(ref[f"latency_ms_b{b}"] / r[f"latency_ms_b{b}"], 2)
    stage.stop()
    return {"workload": wl.name, "seconds": round(time.perf_counter() - t0, 1), "threads": threads,
            "repeats": repeats, "rows": rows, "targets": wl.targets(rows, ctx),
            "targets_apply": wl.targets_apply and not quick, "quick": quick, "peak_rss_mb": stage.process_peak,
            "prepare_s": prepared["stage_s"], "prepare_peak_rss_mb": prepared["stage_peak_rss_mb"],
            "stage_rss_per_stage": stage.per_stage, **wl.summary(ctx)}


def format_rows(result: dict[str, Any], wl: Workload) -> str:
    """The rows as a table (accuracy, size, MACs, latency | drops and ratios), then the workload's notes."""
    acc = "".join(f" {c.header:>{c.width}}" for c in wl.columns)
    drops = "".join(f" {'d' + wl.drops[d][0]:>{max(7, len(wl.drops[d][0]) + 1)}}" for d in wl.drops)
    head = (f"{'row':<40}{acc} {'size B':>9} {'MACs':>10} {'b1 ms':>7} {'b32 ms':>7} {'stage s':>8} "
            f"{'stage MB':>8} {'RSS MB':>7} |{drops} {'size x':>6} {'MACs x':>6} {'b1 x':>5} {'b32 x':>5}")
    lines = [head, "-" * len(head)]

    def cell(v, width: int, fmt: str) -> str:
        return f" {v:>{width}{fmt}}" if isinstance(v, (int, float)) else f" {'-':>{width}}"

    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"{r['row'][:40]:<40} FAILED: {r['failed'][:150]} (after {r.get('stage_s', 0):.1f} s)")
            continue
        lines.append(
            f"{r['row'][:40]:<40}" + "".join(cell(r.get(c.key), c.width, c.fmt) for c in wl.columns)
            + f" {r['size_bytes']:>9} {r['macs']:>10}" + cell(r.get("latency_ms_b1"), 7, ".3f")
            + cell(r.get("latency_ms_b32"), 7, ".3f") + cell(r.get("stage_s"), 8, ".1f")
            + cell(r.get("stage_peak_rss_mb"), 8, ".1f") + f" {r['peak_rss_mb']:>7.1f} |"
            + "".join(cell(r[d], max(7, len(wl.drops[d][0]) + 1), f".{wl.drops[d][1]}f") for d in wl.drops)
            + f" {r['size_ratio']:>6.2f} {r['macs_ratio']:>6.2f}" + cell(r.get("latency_b1_ratio"), 5, ".2f")
            + cell(r.get("latency_b32_ratio"), 5, ".2f"))
    lines.append("")
    lines.append("Accuracy/fidelity: Q/DQ semantics (ORT_ENABLE_BASIC), against the fp32 teacher (first row). "
                 "Latency: ORT CPU kernels, median; int8 CPU latency is as measured here and is NOT the "
                 "edge (TensorRT) speed-up. Stage: building that row (wall time, peak RSS "
                 + ("of the stage alone" if result.get("stage_rss_per_stage", True) else "of the process so far")
                 + f"); preparing (teacher, data) took {result.get('prepare_s', 0):.1f} s. "
                 "RSS MB: the process's peak so far.")
    lines += wl.notes(result)
    if result["targets"] and result["targets_apply"]:
        lines.append(f"Targets ({result['workload']}):")
        for k, t in result["targets"].items():
            lines.append(f"  {'met ' if t['met'] else 'MISS'} {k}: {t['value']}")
    return "\n".join(lines)
