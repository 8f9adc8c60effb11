"""The version is written once, in components/common/version.py, and every copy of it agrees:
the package metadata, `edgeslim --version`, the default container images, the Kubernetes manifests,
the compiled pipeline, the Containerfiles' examples, the docs and the changelog. (The device agent's
status records carry it too: tests/unit/deploy/test_fleet_agent.py.)"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest

from edgeslim.components.common.version import __version__

REPO = Path(__file__).resolve().parents[2]
# An image tag (`edgeslim:0.1.0-cuda`) or a pin (`edgeslim==0.1.0`, `edgeslim[agent]==0.1.0`).
MENTION = re.compile(r"edgeslim(?::|(?:\[[\w,-]*\])?==)(\d+\.\d+[\w.+]*)")


def test_pyproject_reads_the_version_from_version_py():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml writes a version: take it from version.py"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "edgeslim.components.common.version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__), __version__


def test_the_installed_metadata_and_the_package_say_the_same():
    import edgeslim

    assert edgeslim.__version__ == __version__
    assert installed_version("edgeslim") == __version__, (
        "the installed metadata is older than components/common/version.py: reinstall (pip install -e .)")


def test_the_cli_prints_it(capsys):
    from edgeslim.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgeslim {__version__}"


def test_the_default_images_are_tagged_with_it():
    from edgeslim.components.kfp.ops import DEFAULT_ENGINE_IMAGE, DEFAULT_IMAGE, DEFAULT_TRAIN_IMAGE

    assert DEFAULT_IMAGE == f"ghcr.io/edgeslim/edgeslim:{__version__}"
    for image in (DEFAULT_ENGINE_IMAGE, DEFAULT_TRAIN_IMAGE):
        assert image.startswith(f"ghcr.io/edgeslim/edgeslim:{__version__}-"), image


def test_every_file_that_names_a_release_names_this_one():
    files = [*(REPO / "deploy").rglob("*"), *(REPO / "pipelines").glob("*.yaml"), REPO / "README.md",
             *(REPO / "docs").rglob("*.md")]
    seen, wrong = 0, []
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for tag in MENTION.findall(line):
                seen += 1
                if not (tag == __version__ or tag.startswith(f"{__version__}-")):
                    wrong.append(f"{path.relative_to(REPO)}:{n}: edgeslim {tag}")
    assert seen, "no file names an edgeslim image or pin: the pattern no longer matches them"
    assert not wrong, f"these name another release than {__version__}:\n" + "\n".join(wrong)


def test_the_changelog_starts_with_this_release():
    releases = re.findall(r"^## \[([^\]]+)\]", (REPO / "CHANGELOG.md").read_text(), flags=re.M)
    assert [r for r in releases if r != "Unreleased"][:1] == [__version__], releases
