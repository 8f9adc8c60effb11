"""The README's two commands stay true: CI runs the test command exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    demo, tests = _commands()
    assert "edgeslim demo" in demo and "torch==2.13.0" in demo
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f"CI does not run the README test command {tests!r}"


def test_readme_pins_torch_in_both_commands():
    for cmd in _commands():
        assert "torch==2.13.0" in cmd  # an unpinned torch pulls a multi-GB CUDA build
