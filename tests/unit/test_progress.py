"""Progress events: marked in task subprocesses, picked out by the local runner's sink, drawn by the CLI."""

from __future__ import annotations

import io
import subprocess
import sys

from edgeslim.components.common import progress
from edgeslim.pipelines.local import _Echo


def test_a_task_subprocess_event_reaches_the_progress_callback_through_the_sink(monkeypatch):
    """What the local runner does: the task prints a marked line; the sink gets it in pieces."""
    code = ("from edgeslim.components.common import progress; "
            "progress.epochs('distill')(3, 10, 0.25); progress.lines('quantize')('trial 2 ptq entropy: -0.4 pt')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, progress.ENV: "pipe"}).stderr
    got = []
    sink = _Echo(lambda text, kind: got.append((kind, text)))
    for i in range(0, len(out), 7):  # arbitrary chunks, as a pipe delivers them
        sink.write(out[i:i + 7])
    sink.write("\x1b[96mINFO - Executing task 'quantize'\x1b[0m\nTask 'quantize' finished with status SUCCESS\n")
    assert got == [("epoch", "  distill: epoch 3/10, loss 0.2500"),
                   ("trial", "  quantize: trial 2 ptq entropy: -0.4 pt"),
                   ("task", "task quantize: started"), ("task", "task quantize: success")]
    assert progress.MARK in sink.buf.getvalue()  # pipeline.log keeps everything


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
