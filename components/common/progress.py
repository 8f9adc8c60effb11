"""Progress of long steps, from wherever they run, to the terminal of whoever started them.

A stage calls :func:`emit` (or a callback made by :func:`epochs` / :func:`lines`). Where it
goes depends on ``$EDGESLIM_PROGRESS``:

- ``pipe``: inside a task of the local pipeline runner. The line is written to stderr with
  a marker; ``pipelines/local.py`` reads the runner's output, picks the marked lines out
  and hands them to the CLI, which renders them.
- ``off``: nothing (``edgeslim --quiet``).
- unset: a plain, timestamped line on stderr (a KFP task on a cluster: its log).

The CLI renders progress as plain lines when stderr is not a terminal, and on a terminal
redraws one status line for repeated events (epochs, trials) instead of scrolling.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Callable

ENV = "EDGESLIM_PROGRESS"
MARK = "::edgeslim-progress::"


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
    with a progress bar when the line counts steps (``epoch 3/10``)."""

    def __init__(self, stream=None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._open = False  # a redrawable line is on screen

    def __call__(self, text: str, kind: str = "note") -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.tty and kind in ("epoch", "trial", "calibrate"):
            step = _STEP.search(text)
            drawn = f"{bar(int(step[1]), int(step[2]))} {text}" if step else text
            self.stream.write(f"\r\x1b[K[{stamp}] {drawn}")
            self._open = True
        else:
            if self._open:
                self.stream.write("\n")
                self._open = False
            self.stream.write(f"[{stamp}] {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
