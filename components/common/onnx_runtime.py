"""ONNX Runtime, the one way every layer runs a model on CPU (the device agent included).

Q/DQ models run in Q/DQ semantics by default (``basic``): at its default optimization level
ONNX Runtime fuses Q/DQ into int8 CPU kernels that can saturate on x86 without VNNI
(docs/design.md); ``ORT_ENABLE_BASIC`` keeps DequantizeLinear -> float op, which is what
TensorRT's int8 math approximates.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from edgeslim.components.common.errors import ConfigError, DataError, SourceError

# Rows per batch when a split is streamed through models: small enough that a batch of 224-pixel images
# (and each session's activations for it) stays in tens of MB, large enough that ONNX Runtime runs at speed.
STREAM_BATCH = 64


def evaluation_batch(latency_batches) -> int:
    """Rows per batch of an evaluation that times latency on its own runs (:class:`BatchTimer`): the largest
    latency batch, and at least 32 (the recipe's default largest). Every run of the evaluation then has at
    most the timed calls' rows, so a split that ends before the timing does (a few hundred images) peaks
    where a long split does: the evaluation's memory follows the batch, whatever the split's length. ONNX
    Runtime runs as fast per image at 32 rows as at 64."""
    return max(32, *latency_batches)


_SHARED_ARENA: list[bool] = []  # whether this process registered ONNX Runtime's shared CPU arena
_SHARED_ARENA_LOCK = threading.Lock()


def make_session(path: str | Path, *, basic: bool | None = True, threads: int = 0,
                 providers: Optional[list[str]] = None, side_by_side: bool = False):
    """An ONNX Runtime session of ``path``.

    ``basic``: True keeps Q/DQ semantics (``ORT_ENABLE_BASIC``); False gives ONNX Runtime's full
    optimizations (Q/DQ fused into its int8 kernels); None keeps Q/DQ semantics where the graph has Q/DQ
    nodes and optimizes a float graph fully (:func:`has_qdq`): the way to run models that may be either.

    ``threads``: intra-op threads; 0 takes ``$EDGESLIM_ORT_THREADS`` when set, else lets ONNX Runtime
    choose (one per core). Capping it suits a machine whose cores other jobs share: idle ONNX Runtime
    threads spin for a while, and spinning threads beyond the free cores slow everything down.

    ``side_by_side``: the session takes turns with others on every batch (:func:`run_side_by_side`), and
    is made for it in two ways:

    - Its CPU buffers come from one arena per process (ONNX Runtime's environment allocator) instead of
      an arena of its own. An arena keeps the buffers of the largest batch its session has run, for the
      session's life: sessions that take turns with arenas of their own would hold a batch's buffers once
      per model compared. Sharing one holds them once, at the speed of an arena (without any arena, ONNX
      Runtime allocates every buffer on every run: a third slower on a 224-pixel classifier).
    - Its idle intra-op threads sleep at once instead of spinning (ONNX Runtime's default, which suits a
      session run alone): each session has threads of its own, and those of the session that has just run
      would spin on the cores that the next session, and the image decoding beside them, need. On 2 cores,
      evaluating a 224-pixel classifier over 2,000 decoded images took a fifth less time with two sleeping
      threads per session than with one, and a third less than with two spinning ones. docs/benchmarks.md
      has the figures.

    Raises:
        SourceError: ONNX Runtime cannot load the file (one line, with ORT's reason).
        ConfigError: ``$EDGESLIM_ORT_THREADS`` is not a whole number.
    """
    import onnxruntime as ort

    if not threads and os.environ.get("EDGESLIM_ORT_THREADS"):
        raw = os.environ["EDGESLIM_ORT_THREADS"]
        if not raw.strip().isdigit():
            raise ConfigError(f"EDGESLIM_ORT_THREADS={raw!r} is not a whole number; set it to the intra-op "
                              "thread count (e.g. 1), or unset it to let ONNX Runtime choose")
        threads = int(raw)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if side_by_side and (providers or ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]:
        with _SHARED_ARENA_LOCK:  # registered once per process
            if not _SHARED_ARENA:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))  # ORT's default settings
                _SHARED_ARENA.append(True)
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if basic is None:
        basic = has_qdq(path)
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    if side_by_side:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise SourceError(f"ONNX file {path} cannot be loaded by ONNX Runtime ({str(exc)[:160]})") from None


def has_qdq(path: str | Path) -> bool:
    """Whether the ONNX graph at ``path`` has QuantizeLinear or DequantizeLinear nodes (its subgraphs
    included). Only those need ``ORT_ENABLE_BASIC`` to keep their meaning (:func:`make_session`): a float
    graph keeps it under ONNX Runtime's full optimizations, which round its float math differently (by
    about 1e-7) and lay its convolutions out for the CPU: a float CNN then runs 1.5-2 times as fast."""
    import onnx

    def quantizes(graph) -> bool:
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                return True
            for attr in node.attribute:
                if any(quantizes(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)):
                    return True
        return False

    try:
        return quantizes(onnx.load(str(path), load_external_data=False).graph)
    except Exception:  # not ONNX onnx can read: ONNX Runtime names the problem when it loads it
        return True


@contextlib.contextmanager
def session_with_outputs(model, names: list[str]) -> Iterator:
    """A session (Q/DQ semantics) of ``model`` in which the intermediate tensors ``names`` are graph
    outputs too, so one run returns their values. ``model`` is an ONNX path, or a ModelProto that
    gains the outputs (no copy: calibration models can be large)."""
    import onnx

    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.ValueInfoProto(name=n) for n in names if n not in have)
    with tempfile.TemporaryDirectory(prefix="edgeslim-probe-") as tmp:
        onnx.save(model, str(Path(tmp) / "probe.onnx"))
        yield make_session(Path(tmp) / "probe.onnx")


def run_outputs(session, x: np.ndarray, batch: int = STREAM_BATCH) -> tuple[list[str], list[np.ndarray]]:
    """Every output of ``session`` on ``x`` (fed to its first input), joined over batches of ``batch``."""
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, len(x), batch):
        for k, o in enumerate(session.run(None, {name: x[i:i + batch]})):
            parts[k].append(o)
    return names, [np.concatenate(p) for p in parts]


def run_batched(session, x: np.ndarray, batch: int = STREAM_BATCH) -> np.ndarray:
    """The output of ``session`` on ``x`` as one ``(N, ...)`` array; several outputs are flattened and
    joined along axis 1."""
    _, outs = run_outputs(session, x, batch)
    if len(outs) == 1:
        return outs[0]
    return np.concatenate([o.reshape(len(o), -1) for o in outs], axis=1)


def stream_batches(x, batch: int = STREAM_BATCH, quiet: Optional[Callable[[], bool]] = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` of ``x`` a batch at a time, each row read once. The next batch is read on a
    thread while the caller works on this one (a lazy split decodes while the models run): at most two
    batches are held. ``quiet()`` true when a batch is handed over: the next batch is read first, so that
    nothing decodes while the caller works on this one (what it times is the models alone)."""
    n = len(x)
    if n == 0:
        return

    def read(i: int) -> np.ndarray:
        return np.ascontiguousarray(x[i:i + batch], dtype=np.float32)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeslim-prefetch") as pool:
        ahead = pool.submit(read, 0)
        for i in range(0, n, batch):
            rows = ahead.result()
            if i + batch < n:
                ahead = pool.submit(read, i + batch)
                if quiet is not None and quiet():
                    concurrent.futures.wait([ahead])
            yield i, rows


class BatchTimer:
    """Latency at the recipe's batch sizes, timed on the runs an evaluation makes anyway: while a model
    still lacks timed runs at a batch size, its share of each streamed batch is run ``b`` rows a call,
    each call timed, and the outputs joined (the same outputs, read from the same decoded rows). The
    first ``warmup`` calls per model and size are discarded and the median of the next ``repeats`` is
    reported, as :func:`latency_ms` does; a split with too few rows for them is completed on the first
    batch's rows (repeated up to ``b``) by :meth:`result`. Timing therefore costs no extra run over a
    split of ``(warmup + repeats) * max(batches)`` rows or more, whatever the split's size.

    Args:
        models: the indices (in :func:`run_side_by_side`'s ``sessions``) of the models timed.
        batches, warmup, repeats: the recipe's ``evaluate`` latency settings.
    """

    def __init__(self, models: Sequence[int], batches: Sequence[int], warmup: int, repeats: int):
        self.batches, self.warmup, self.repeats = sorted(set(batches)), warmup, repeats
        self.times: dict[tuple[int, int], list[float]] = {(k, b): [] for k in models for b in self.batches}
        self.first: Optional[np.ndarray] = None  # the first batch's first rows, for :meth:`result`
        self.whole: set[int] = set()  # models whose outputs cannot be split by rows: timed apart

    def busy(self) -> bool:
        """Whether any model still lacks timed runs (the next batch is then worked on with nothing decoding)."""
        need = self.warmup + self.repeats
        return any(len(t) < need for (k, _), t in self.times.items() if k not in self.whole)

    def run(self, k: int, session, feed: str, rows: np.ndarray) -> list[np.ndarray]:
        """Model ``k``'s outputs on ``rows``, timed ``b`` rows a call where it still lacks runs at ``b``."""
        if self.first is None:
            self.first = rows[:self.batches[-1]].copy()
        need = self.warmup + self.repeats
        b = next((b for b in self.batches if (k, b) in self.times and len(self.times[(k, b)]) < need
                  and b <= len(rows) and k not in self.whole), None)
        if b is None:
            return session.run(None, {feed: rows})
        calls = min(need - len(self.times[(k, b)]), len(rows) // b)
        parts, took = [], []
        for j in range(calls):
            t = time.perf_counter()
            parts.append(session.run(None, {feed: rows[j * b:(j + 1) * b]}))
            took.append((time.perf_counter() - t) * 1000.0)
        if calls * b < len(rows):
            parts.append(session.run(None, {feed: rows[calls * b:]}))
        if any(np.ndim(o) == 0 or len(o) != len(part) for p, part in zip(parts, _chunks(rows, b, calls))
               for o in p):  # an output without the batch as its first axis: time this model apart
            self.whole.add(k)
            return session.run(None, {feed: rows})
        self.times[(k, b)].extend(took)
        return [np.concatenate(o) for o in zip(*parts)]

    def result(self, k: int, session) -> dict[str, float]:
        """``{"batch_<b>": median ms}`` of model ``k``; runs still lacking are timed on the first batch's
        rows (:func:`latency_ms`'s way)."""
        out = {}
        for b in self.batches:
            got = self.times[(k, b)] if k not in self.whole else []
            short = self.warmup + self.repeats - len(got)
            if short > 0 and self.first is not None:
                x = self.first
                got = got + _timed(session, x[:b] if len(x) >= b else x[np.arange(b) % len(x)], short)
            out[f"batch_{b}"] = round(statistics.median(got[self.warmup:] or got), 4) if got else 0.0
        return out


def _chunks(rows: np.ndarray, b: int, calls: int) -> list[np.ndarray]:
    """The pieces :meth:`BatchTimer.run` runs: ``calls`` of ``b`` rows, then the rest."""
    pieces = [rows[j * b:(j + 1) * b] for j in range(calls)]
    return pieces + ([rows[calls * b:]] if calls * b < len(rows) else [])


def _timed(session, xb: np.ndarray, runs: int) -> list[float]:
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(xb)}
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1000.0)
    return times


def sample_rows(n: int, samples: int) -> np.ndarray:
    """``samples`` row indices spread evenly over a split of ``n`` rows (all of them when ``samples >= n``):
    a figure measured on part of a split sees all of it, whatever order its provider lists it in."""
    if samples >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(samples, 0)).round().astype(np.int64))


def run_side_by_side(sessions: Sequence, x, batch: int = STREAM_BATCH, *, on_error=None,
                     timer: Optional[BatchTimer] = None, only: Optional[dict[int, np.ndarray]] = None
                     ) -> Iterator[tuple[int, np.ndarray, list[Optional[list[np.ndarray]]]]]:
    """Every session on each batch of ``x`` as it is read: ``(start, rows, outputs per session)``.
    Comparing models costs one read (one decode of a lazy split) per row, not one per model. Make the
    sessions with ``side_by_side=True`` (:func:`make_session`): each would otherwise keep a batch's buffers,
    and spin on the cores the next one needs.

    ``on_error(k, rows, exc)``: the exception to raise when session ``k`` fails on a batch (ONNX Runtime
    raises its own types, e.g. for a shape it does not take); without it the error goes through.
    ``timer``: times its models on these runs (:class:`BatchTimer`); nothing decodes while it still does.
    ``only``: ``{k: sorted row indices}``, a session run on those rows alone (its outputs hold those of the
    batch's rows that are listed, in order; ``None`` for a batch with none)."""
    feeds = [s.get_inputs()[0].name for s in sessions]
    only = only or {}
    for start, rows in stream_batches(x, batch, quiet=timer.busy if timer is not None else None):
        outs: list[Optional[list[np.ndarray]]] = []
        for k, (sess, name) in enumerate(zip(sessions, feeds)):
            feed = rows
            if k in only:
                idx = only[k]
                local = idx[(idx >= start) & (idx < start + len(rows))] - start
                if not len(local):
                    outs.append(None)
                    continue
                feed = rows if len(local) == len(rows) else np.ascontiguousarray(rows[local])
            try:
                if timer is not None and feed is rows:
                    outs.append(timer.run(k, sess, name, rows))
                else:
                    outs.append(sess.run(None, {name: feed}))
            except Exception as exc:
                if on_error is None:
                    raise
                raise on_error(k, feed, exc) from None
        yield start, rows, outs


def input_rejected(onnx_path: str | Path, x, exc: Exception) -> DataError:
    """The one-line error for a model that fails on the inputs ``x`` (ONNX Runtime raises its own types, e.g. for
    a shape the model does not take): the model, the inputs' shape and ONNX Runtime's first line."""
    return DataError(
        f"{Path(onnx_path).name} rejects inputs of shape {list(x.shape)} "
        f"({str(exc).splitlines()[0][:140]}); give data whose x arrays match the model's input")


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference``, in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    noise = ref - np.asarray(candidate, dtype=np.float64).ravel()
    n = float(np.sum(noise * noise))
    if n == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.sum(ref * ref)), 1e-30) / n))


class SqnrAccumulator:
    """:func:`sqnr_db` over batches: the signal and noise powers are summed as the batches come,
    so two models' outputs over a whole split are compared without holding them."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        noise = ref - np.asarray(candidate, dtype=np.float64).ravel()
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(noise * noise))

    def db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        return float(10.0 * np.log10(max(self.signal, 1e-30) / self.noise))


def latency_ms(session, x: np.ndarray, batch: int, warmup: int, repeats: int) -> float:
    """Median wall time of one ``session.run`` at ``batch``, in milliseconds. ``x``: the inputs (the first
    ``batch`` rows are read; repeated where there are fewer)."""
    xb = x[:batch] if len(x) >= batch else x[np.arange(batch) % len(x)]
    return round(statistics.median(_timed(session, xb, warmup + repeats)[warmup:]), 4)
