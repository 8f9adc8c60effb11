"""Progress of long steps, from wherever they run, to the terminal of whoever started them.

A stage calls :func:`emit` (or a callback made by :func:`epochs` / :func:`lines`). Where it
goes depends on ``$EDGESLIM_PROGRESS``:

- ``pipe``: inside a task of the local pipeline runner. The line is written to stderr with
  a marker; ``pipelines/local.py`` reads the runner's output, picks the marked lines out
  and hands them to the CLI, which renders them.
- ``off``: nothing (``edgeslim --quiet``).
- unset: a plain, timestamped line on stderr (a KFP task on a cluster: its log).

The CLI renders progress as plain lines when stderr is not a terminal, and on a terminal
redraws one status line for repeated events (epochs, trials) instead of scrolling. A step that
says nothing for a while (a server booting, a task's subprocess importing torch) runs under a
:class:`Ticker`, which reports it as still running after :data:`HEARTBEAT_S` seconds of silence.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from typing import Any, Callable

ENV = "EDGESLIM_PROGRESS"
MARK = "::edgeslim-progress::"
# A Ticker speaks after this many seconds without a line.
HEARTBEAT_S = 5.0


def emit(kind: str, text: str, **fields: Any) -> None:
    """One progress event: ``kind`` is task, epoch, calibrate, trial, wave or note."""
    mode = os.environ.get(ENV, "")
    if mode == "off":
        return
    if mode == "pipe":
        print(MARK + json.dumps({"kind": kind, "text": text, **fields}, default=str), file=sys.stderr, flush=True)
    else:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The event in one line of a task's output, or ``None``."""
    i = line.find(MARK)
    if i < 0:
        return None
    try:
        event = json.loads(line[i + len(MARK):].strip())
    except ValueError:
        return None
    return event if isinstance(event, dict) and "text" in event else None


def epochs(what: str) -> Callable[..., None]:
    """A training-loop callback: ``(epoch, epochs, loss)`` or ``(label, epoch, epochs, loss)``."""
    def tick(*args: Any) -> None:
        label, (epoch, total, loss) = (args[0], args[1:]) if len(args) == 4 else (what, args)
        emit("epoch", f"{label}: epoch {epoch}/{total}, loss {loss:.4f}", epoch=epoch, epochs=total, loss=loss)
    return tick


def lines(what: str, kind: str = "trial") -> Callable[[str], None]:
    """A callback for stages that report one line per step (the search's trials)."""
    return lambda text: emit(kind, f"{what}: {text}")


def bar(done: int, total: int, width: int = 20) -> str:
    """A text progress bar, ``[#######.............]  35%``."""
    share = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    full = int(round(share * width))
    return f"[{'#' * full}{'.' * (width - full)}] {share:4.0%}"


_STEP = re.compile(r"\b(?:epoch|step|wave) (\d+)/(\d+)\b")


class Renderer:
    """Draws events on a stream: plain lines, or on a terminal one redrawn line per repeated kind,
    with a progress bar when the line counts steps (``epoch 3/10``). Heartbeats (a :class:`Ticker`'s
    lines) redraw only each other: the redrawn line before them stays on screen."""

    def __init__(self, stream=None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._open: str | None = None  # the kind of the redrawable line on screen

    def __call__(self, text: str, kind: str = "note") -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.tty and kind in ("epoch", "trial", "calibrate", "heartbeat"):
            if kind == "heartbeat" and self._open not in (None, "heartbeat"):
                self.stream.write("\n")
            step = _STEP.search(text)
            drawn = f"{bar(int(step[1]), int(step[2]))} {text}" if step else text
            self.stream.write(f"\r\x1b[K[{stamp}] {drawn}")
            self._open = kind
        else:
            if self._open:
                self.stream.write("\n")
                self._open = None
            self.stream.write(f"[{stamp}] {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = None


class Ticker:
    """Passes progress lines on to ``say(text, kind)``; after :data:`HEARTBEAT_S` seconds without
    one, says ``doing`` again with its running time (``"task quantize-op: running (10 s)"``), and
    again after each further silence of that length.

    Use it as a context manager around a step, and give the step the ticker as its progress
    callback: its own lines go through, and restart the silence. ``doing`` may change as the step
    moves on (``start``). Lines are passed on one at a time, from the step's thread or the ticker's.
    """

    def __init__(self, say: Callable[..., None], doing: str, every: float | None = None) -> None:
        self.say, self.every = say, HEARTBEAT_S if every is None else every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.doing, self._since = doing, time.monotonic()
        self._last = self._since

    def __call__(self, text: str, kind: str = "note") -> None:
        with self._lock:
            self._last = time.monotonic()
            self.say(text, kind)

    def start(self, doing: str) -> None:
        """From now on the step is ``doing``; its running time counts from now."""
        with self._lock:
            self.doing, self._since = doing, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every / 10):
            with self._lock:
                now = time.monotonic()
                if now - self._last >= self.every:
                    self._last = now
                    self.say(f"{self.doing} ({now - self._since:.0f} s)", "heartbeat")

    def __enter__(self) -> "Ticker":
        self._thread = threading.Thread(target=self._run, name="edgeslim-ticker", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
