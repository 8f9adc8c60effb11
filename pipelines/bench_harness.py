"""The one bench harness of ``edgeslim bench``: every row of a workload side by side, in one
process, on the same data.

A workload (:class:`Workload`) says how its teacher and data are made, which rows it builds (the
fp32 teacher first: every ratio and drop is against it) and how a row's accuracy is measured. The
harness measures what every row shares, in the same way for every workload: size, MACs, ONNX
Runtime latency at batch 1 and 32 (median of ``--repeats`` runs, ``--threads`` intra-op threads),
the peak RSS of the process so far, and the ratios and drops against the first row.

The workloads and the command are in :mod:`.bench`.

Accuracy and fidelity are measured in Q/DQ semantics (what TensorRT's int8 math approximates, see
DESIGN.md); latency is ONNX Runtime on this CPU with its default optimizations. CPU int8 latency is
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


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _common(spec: RowSpec, data, threads: int, repeats: int) -> dict[str, Any]:
    from edgeslim.components.common.onnx_runtime import latency_ms, make_session

    fast = make_session(spec.path, basic=False, threads=threads)
    return {"size_bytes": spec.path.stat().st_size, "macs": int(spec.macs),
            "latency_ms_b1": latency_ms(fast, data.x_test, 1, 20, repeats),
            "latency_ms_b32": latency_ms(fast, data.x_test, 32, 10, repeats)}


def run_workload(wl: Workload, *, workdir: str | Path, threads: int = 1, repeats: int = 50,
                 seed: int = 0, quick: bool = False, log=print) -> dict[str, Any]:
    """Prepare the workload, build and measure every row; returns ``{rows, targets, ...}``."""
    ctx = Context(workdir=Path(workdir), seed=seed, quick=quick, log=log)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wl.prepare(ctx)
    rows: list[dict[str, Any]] = []
    reference = None
    for spec in wl.rows(ctx):
        if spec.failed or spec.path is None:
            log(f"  {spec.name}: no model ({spec.failed})")
            rows.append({"row": spec.name, "failed": spec.failed or "no model"})
            continue
        acc, state = wl.accuracy(ctx, spec, reference)
        if reference is None:
            reference = state
        row = {"row": spec.name, "model": str(spec.path), "int8": spec.int8, **acc,
               **_common(spec, ctx.data, threads, repeats), **spec.extra, "peak_rss_mb": peak_rss_mb()}
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
        r["latency_b1_ratio"] = round(ref["latency_ms_b1"] / r["latency_ms_b1"], 2)
        r["latency_b32_ratio"] = round(ref["latency_ms_b32"] / r["latency_ms_b32"], 2)
    return {"workload": wl.name, "seconds": round(time.perf_counter() - t0, 1), "threads": threads,
            "repeats": repeats, "rows": rows, "targets": wl.targets(rows, ctx),
            "targets_apply": wl.targets_apply and not quick, "quick": quick, "peak_rss_mb": peak_rss_mb(),
            **wl.summary(ctx)}


def format_rows(result: dict[str, Any], wl: Workload) -> str:
    """The rows as a table (accuracy, size, MACs, latency | drops and ratios), then the workload's notes."""
    acc = "".join(f" {c.header:>{c.width}}" for c in wl.columns)
    drops = "".join(f" {'d' + wl.drops[d][0]:>{max(7, len(wl.drops[d][0]) + 1)}}" for d in wl.drops)
    head = (f"{'row':<40}{acc} {'size B':>9} {'MACs':>10} {'b1 ms':>7} {'b32 ms':>7} {'RSS MB':>7} |"
            f"{drops} {'size x':>6} {'MACs x':>6} {'b1 x':>5} {'b32 x':>5}")
    lines = [head, "-" * len(head)]

    def cell(v, width: int, fmt: str) -> str:
        return f" {v:>{width}{fmt}}" if isinstance(v, (int, float)) else f" {'-':>{width}}"

    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"{r['row'][:40]:<40} FAILED: {r['failed'][:150]}")
            continue
        lines.append(
            f"{r['row'][:40]:<40}" + "".join(cell(r.get(c.key), c.width, c.fmt) for c in wl.columns)
            + f" {r['size_bytes']:>9} {r['macs']:>10} {r['latency_ms_b1']:>7.3f} {r['latency_ms_b32']:>7.3f}"
            + f" {r['peak_rss_mb']:>7.1f} |"
            + "".join(cell(r[d], max(7, len(wl.drops[d][0]) + 1), f".{wl.drops[d][1]}f") for d in wl.drops)
            + f" {r['size_ratio']:>6.2f} {r['macs_ratio']:>6.2f} {r['latency_b1_ratio']:>5.2f}"
            + f" {r['latency_b32_ratio']:>5.2f}")
    lines.append("")
    lines.append("Accuracy/fidelity: Q/DQ semantics (ORT_ENABLE_BASIC), against the fp32 teacher (first row). "
                 "Latency: ORT CPU kernels, median; int8 CPU latency is as measured here and is NOT the "
                 "edge (TensorRT) speed-up. RSS: the process's peak so far.")
    lines += wl.notes(result)
    if result["targets"] and result["targets_apply"]:
        lines.append(f"Targets ({result['workload']}):")
        for k, t in result["targets"].items():
            lines.append(f"  {'met ' if t['met'] else 'MISS'} {k}: {t['value']}")
    return "\n".join(lines)
