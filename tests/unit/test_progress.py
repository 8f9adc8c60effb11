"""Progress events: marked in task subprocesses, picked out by the local runner's sink, drawn by the CLI."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import threading

from edgeslim.components.common import progress
from edgeslim.pipelines.local import PIPELINE_RUNNING, _Echo


def test_a_task_subprocess_event_reaches_the_progress_callback_through_the_sink(monkeypatch):
    """What the local runner does: the task prints a marked line; the sink gets it in pieces."""
    code = ("from edgeslim.components.common import progress; "
            "progress.epochs('distill')(3, 10, 0.25); progress.lines('quantize')('trial 2 ptq entropy: -0.4 pt')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, progress.ENV: "pipe"}).stderr
    got, running = [], []
    sink = _Echo(lambda text, kind: got.append((kind, text)), running.append)
    for i in range(0, len(out), 7):  # arbitrary chunks, as a pipe delivers them
        sink.write(out[i:i + 7])
    sink.write("\x1b[96mINFO - Executing task 'quantize'\x1b[0m\nTask 'quantize' finished with status SUCCESS\n")
    assert got == [("epoch", "  distill: epoch 3/10, loss 0.2500"),
                   ("trial", "  quantize: trial 2 ptq entropy: -0.4 pt"),
                   ("task", "task quantize: started"), ("task", "task quantize: success")]
    assert progress.MARK in sink.buf.getvalue()  # pipeline.log keeps everything
    assert running == ["task quantize: running", PIPELINE_RUNNING]  # what a heartbeat names


def test_a_ticker_passes_lines_on_and_says_what_runs_when_nothing_else_does():
    got, heard = [], threading.Event()

    def say(text, kind="note"):
        got.append((kind, text))
        heard.set() if kind == "heartbeat" else None

    with progress.Ticker(say, "task x: running", every=0.05) as tick:
        tick("x: epoch 1/2", "epoch")
        assert heard.wait(60)
        tick.start("task y: running")
        heard.clear()
        assert heard.wait(60)
    assert not tick._thread.is_alive()  # gone with its block
    assert got[0] == ("epoch", "x: epoch 1/2")
    beats = [text for kind, text in got if kind == "heartbeat"]
    assert re.fullmatch(r"task x: running \(\d+ s\)", beats[0]) and beats[-1].startswith("task y: running (")


def test_the_demo_says_what_it_waits_for(monkeypatch, tmp_path):
    """Every step of the demo before the pipeline speaks: the teacher's every epoch, and a heartbeat while
    the MLflow server boots (this fake one answers only once the heartbeat was drawn)."""
    from edgeslim import cli_main
    from edgeslim.components.common import mlflow_server, tracking
    from edgeslim.pipelines import demo

    shown, waited = [], threading.Event()

    class Shown:
        def __call__(self, text, kind="note"):
            shown.append((kind, text))
            if text.startswith("waiting for MLflow at http://127.0.0.1:1 ("):
                waited.set()

        def close(self):
            pass

    class Server:
        def __init__(self, root):
            self.root, self.uri, self.artifacts = root, "http://127.0.0.1:1", root / "artifacts"

        def launch(self):
            pass

        def wait_ready(self):
            assert waited.wait(60), shown

        def stop(self):
            pass

    def train(progress):
        for epoch in (1, 2, 3):
            progress(f"teacher: training epoch {epoch}/3 (loss 0.100)")

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(cli_main, "_renderer", Shown())
    monkeypatch.setattr(mlflow_server, "MlflowServer", Server)
    monkeypatch.setattr(demo, "train_teacher", train)
    monkeypatch.setattr(demo, "ensure_teacher", lambda client, progress, trained: progress("teacher: registered"))
    monkeypatch.setattr(tracking, "connect", lambda uri: None)
    monkeypatch.setattr(cli_main, "execute", lambda recipe, **kw: 0)
    assert cli_main.cmd_demo(argparse.Namespace(workdir=str(tmp_path), workload="digits", verbose=False)) == 0
    lines = [text for _, text in shown]
    epochs = [text for kind, text in shown if kind == "epoch"]
    assert epochs == [f"teacher: training epoch {e}/3 (loss 0.100)" for e in (1, 2, 3)]
    assert lines.index("training the reference model while MLflow starts") < lines.index(epochs[0])
    assert lines.index(f"MLflow at http://127.0.0.1:1") > lines.index(epochs[-1])
    assert "teacher: registered" in lines


def test_plain_lines_off_a_terminal_and_one_redrawn_line_on_it():
    plain = io.StringIO()
    r = progress.Renderer(plain, tty=False)
    r("a: epoch 1/2", "epoch")
    r("a: epoch 2/2", "epoch")
    r("task a: succeeded", "task")
    assert [line.split("] ", 1)[1] for line in plain.getvalue().splitlines()] == \
        ["a: epoch 1/2", "a: epoch 2/2", "task a: succeeded"]
    term = io.StringIO()
    r = progress.Renderer(term, tty=True)
    r("a: epoch 1/2", "epoch")
    r("a: epoch 2/2", "epoch")
    r("task a: succeeded", "task")
    text = term.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.count("\n") == 2  # epochs share a line; the task ends it
    # on the terminal a counted step gets a bar; off it, the line stays as it was
    assert "[##########..........]  50% a: epoch 1/2" in text and "[####################] 100% a: epoch 2/2" in text
    assert "#" not in plain.getvalue()


def test_quiet_turns_progress_off_and_the_version_is_printed(monkeypatch, capsys):
    from edgeslim.cli import main

    monkeypatch.setenv(progress.ENV, "off")
    progress.emit("note", "nobody sees this")
    assert capsys.readouterr().err == ""
    out = subprocess.run([sys.executable, "-m", "edgeslim", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("edgeslim ")
    assert main(["-q", "fleet", "list", "f", "--store", str(__import__("tempfile").mkdtemp())]) == 0
