"""Run the pipeline on this machine with Kubeflow's local runner (subprocesses, no venv)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common import progress as progress_events
from edgeslim.components.common.errors import EdgeslimError, GateRejected

_TASK_LINE = re.compile(r"Task '([^']+)' finished with status (\w+)")
_START_LINE = re.compile(r"Executing task '([^']+)'")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"edgeslim\.components\.common\.errors\.(\w+): (.*)")
# What a heartbeat says between tasks (Kubeflow's runner is laying out the next one).
PIPELINE_RUNNING = "the pipeline: running"


class PipelineTaskFailed(EdgeslimError):
    """A task of the local pipeline run failed."""


class PipelineGateRejected(PipelineTaskFailed):
    """A task refused the candidate (the accuracy-aware quantizer found none that passes the gate):
    a verdict, not a crash, so the exit code is the gate's (3)."""

    exit_code = GateRejected.exit_code


class _Echo(io.TextIOBase):
    """Collects the runner's output; passes task starts and ends, and the progress events the
    tasks emit (``components/common/progress.py``), to ``progress(text, kind)``, and what is
    running now to ``running(what)`` (a task, or the pipeline between tasks)."""

    def __init__(self, progress: Callable[..., None] | None, running: Callable[[str], None] | None = None):
        self.buf = io.StringIO()
        self.progress = progress
        self.running = running
        self._partial = ""

    def write(self, s: str) -> int:
        self.buf.write(s)
        if self.progress:
            text = self._partial + _ANSI.sub("", s)
            *whole, self._partial = text.split("\n")
            for line in whole:
                self._line(line)
        return len(s)

    def _line(self, line: str) -> None:
        event = progress_events.parse(line)
        if event is not None:
            self.progress("  " + str(event["text"]), str(event.get("kind", "note")))
        elif m := _START_LINE.search(line):
            self.progress(f"task {m.group(1)}: started", "task")
            if self.running:
                self.running(f"task {m.group(1)}: running")
        elif m := _TASK_LINE.search(line):
            self.progress(f"task {m.group(1)}: {m.group(2).lower()}", "task")
            if self.running:
                self.running(PIPELINE_RUNNING)


def _task_error(log: str) -> tuple[str, str] | None:
    """The type and the one line of the edgeslim error a task raised, if there was one."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log)
    hits = _ERROR_LINE.findall(clean)
    if hits:
        return hits[-1][0], hits[-1][1].strip()
    return None


def run_pipeline(recipe, *, tracking_uri: str, workdir: str | Path,
                 progress: Callable[[str], None] | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run the edge-compression pipeline locally and return its report.

    Raises:
        PipelineTaskFailed: a task failed; the message is the task's own error line.
    """
    from kfp import local

    from edgeslim.pipelines.edge_compression import build_pipeline

    workdir = Path(workdir).resolve()
    root = workdir / "kfp-local"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True)
    # Laid out for this recipe: without distill or prune, no transform task and no second export.
    pipeline = build_pipeline(engines=recipe.engines, placement=False, torch_stages=bool(recipe.torch_stages))
    # A task's subprocess may say nothing for a while (imports, loading data): the ticker says which runs.
    ticker = progress_events.Ticker(progress, PIPELINE_RUNNING) if progress and not verbose else None
    sink = _Echo(ticker, ticker.start if ticker else None)
    kfp_logger = logging.getLogger("kfp")
    handlers = list(kfp_logger.handlers)
    t0 = time.perf_counter()
    # The tasks run in subprocesses that inherit this: their progress comes back marked, through the sink.
    saved_mode = os.environ.get(progress_events.ENV)
    if saved_mode != "off":
        os.environ[progress_events.ENV] = "pipe" if not verbose else ""
    try:
        if verbose:
            task = pipeline(recipe_json=recipe.to_json(), tracking_uri=tracking_uri)
        else:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), ticker or contextlib.nullcontext():
                for h in handlers:
                    if isinstance(h, logging.StreamHandler):
                        h.setStream(sink)
                task = pipeline(recipe_json=recipe.to_json(), tracking_uri=tracking_uri)
    except RuntimeError as exc:
        log = sink.buf.getvalue()
        (workdir / "pipeline.log").write_text(log)
        found = _task_error(log)
        err = found[1] if found else None
        kind = PipelineGateRejected if found and found[0] == GateRejected.__name__ else PipelineTaskFailed
        raise kind(
            (err or f"local pipeline run failed: {str(exc).splitlines()[0][:200]}")
            + ("" if err else f"; see {workdir / 'pipeline.log'}")
        ) from None
    finally:
        for h in handlers:
            if isinstance(h, logging.StreamHandler):
                h.setStream(sys.stderr)
        if saved_mode is None:
            os.environ.pop(progress_events.ENV, None)
        else:
            os.environ[progress_events.ENV] = saved_mode
    (workdir / "pipeline.log").write_text(sink.buf.getvalue())
    report_art = task.outputs if not hasattr(task, "output") else task.output
    report = json.loads(Path(report_art.path).read_text())
    report["seconds"]["pipeline_total"] = round(time.perf_counter() - t0, 2)
    html_src = Path(report_art.path).with_name("html")  # report_op's other output
    onnx = Path(report["candidate"]["onnx_path"])
    if onnx.exists():
        dst = workdir / "model.int8.onnx"
        shutil.copyfile(onnx, dst)
        report["candidate"]["onnx_path"] = str(dst)
    report["_html_src"] = str(html_src)
    return report
