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
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from edgeslim.components.common.errors import ConfigError, DataError, SourceError

# Rows per batch when a split is streamed through models: small enough that a batch of 224-pixel images
# (and each session's activations for it) stays in tens of MB, large enough that ONNX Runtime runs at speed.
STREAM_BATCH = 64


def make_session(path: str | Path, *, basic: bool = True, threads: int = 0,
                 providers: Optional[list[str]] = None):
    """An ONNX Runtime session of ``path``; ``basic`` keeps Q/DQ semantics.

    ``threads``: intra-op threads; 0 takes ``$EDGESLIM_ORT_THREADS`` when set, else lets ONNX Runtime
    choose (one per core). Capping it suits a machine whose cores other jobs share: idle ONNX Runtime
    threads spin for a while, and spinning threads beyond the free cores slow everything down.

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
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise SourceError(f"ONNX file {path} cannot be loaded by ONNX Runtime ({str(exc)[:160]})") from None


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


def stream_batches(x, batch: int = STREAM_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` of ``x`` a batch at a time, each row read once. The next batch is read on a
    thread while the caller works on this one (a lazy split decodes while the models run): at most two
    batches are held."""
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
            yield i, rows


def run_side_by_side(sessions: Sequence, x, batch: int = STREAM_BATCH, *, on_error=None
                     ) -> Iterator[tuple[int, np.ndarray, list[list[np.ndarray]]]]:
    """Every session on each batch of ``x`` as it is read: ``(start, rows, outputs per session)``.
    Comparing models costs one read (one decode of a lazy split) per row, not one per model.

    ``on_error(k, rows, exc)``: the exception to raise when session ``k`` fails on a batch (ONNX Runtime
    raises its own types, e.g. for a shape it does not take); without it the error goes through."""
    feeds = [s.get_inputs()[0].name for s in sessions]
    for start, rows in stream_batches(x, batch):
        outs = []
        for k, (sess, name) in enumerate(zip(sessions, feeds)):
            try:
                outs.append(sess.run(None, {name: rows}))
            except Exception as exc:
                if on_error is None:
                    raise
                raise on_error(k, rows, exc) from None
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
    xb = np.ascontiguousarray(x[:batch] if len(x) >= batch else x[np.arange(batch) % len(x)])
    feed = {session.get_inputs()[0].name: xb}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1000.0)
    return round(statistics.median(times), 4)
