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


def test_the_test_command_installs_from_the_lock_and_the_lock_pins_everything():
    _, tests = _commands()
    assert "-c tests/requirements.lock" in tests
    lines = [ln for ln in (REPO / "tests" / "requirements.lock").read_text().splitlines()
             if ln and not ln.startswith((" ", "#"))]
    unpinned = [ln for ln in lines if not re.fullmatch(r"[A-Za-z0-9._-]+==[^\s;]+", ln)]
    assert lines and not unpinned, f"tests/requirements.lock has lines that pin nothing: {unpinned}"
    names = {ln.split("==")[0].lower() for ln in lines}
    assert {"torch", "mlflow", "kfp", "onnxruntime", "boto3", "pytest"} <= names


def test_the_readme_is_at_most_150_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the reference belongs in docs/ (mkdocs.yml)"


def test_the_readmes_relative_links_point_at_files_that_exist():
    text = (REPO / "README.md").read_text()
    links = [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (REPO / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
