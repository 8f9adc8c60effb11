"""Every command and option of every edgeslim command line says what it is for, and no help shows reST
markup (descriptions taken from docstrings are made plain)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from edgeslim.components.common.helptext import plain
from tests.parsers import walk

REPO = Path(__file__).resolve().parents[2]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from edgeslim.cli import build_parser
    from edgeslim.deploy.agent import device, health
    from edgeslim.pipelines import bench_fleet

    return {"edgeslim": build_parser(), "edgeslim-agent": device.build_parser(),
            "python -m edgeslim.deploy.agent.health": health.build_parser(),
            "python -m edgeslim.pipelines.bench_fleet": bench_fleet.build_parser()}


# The modules that build those parsers: a new parser elsewhere must join _parsers() to be checked.
PARSER_MODULES = {"src/edgeslim/cli.py", "deploy/agent/device.py", "deploy/agent/health.py", "pipelines/bench_fleet.py"}


def _all():
    return [(path, p) for prog, parser in _parsers().items() for path, p in walk(parser, prog)]


def test_every_parser_is_checked():
    found = {str(f.relative_to(REPO)) for d in ("src", "components", "pipelines", "plugins", "deploy")
             for f in (REPO / d).rglob("*.py") if "ArgumentParser(" in f.read_text()}
    assert found == PARSER_MODULES


def test_every_command_and_option_has_help():
    missing = []
    for path, parser in _all():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if not (action.help or "").strip():
                missing.append(f"{path} {name}")
            if isinstance(action, argparse._SubParsersAction):
                described = {a.dest for a in action._choices_actions if (a.help or "").strip()}
                missing += [f"{path} {cmd} (the command)" for cmd in action.choices if cmd not in described]
    assert not missing, "no help text:\n" + "\n".join(missing)


def test_no_help_shows_rest_markup():
    shown = [(path, parser.format_help()) for path, parser in _all()]
    assert len(shown) > 30  # the walk reached the subcommands
    bad = [f"{path}: {m.group(0)!r}" for path, text in shown
           for m in re.finditer(r"``|:[a-z]+:`|\w::$", text, re.M)]
    assert not bad, "\n".join(bad)


def test_fleet_help_is_plain_text():
    from tests.conftest import run_cli

    proc = run_cli("fleet", "--help", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout and "$EDGESLIM_FLEET_STORE" in proc.stdout
    assert "`edgeslim fleet root-init`" in proc.stdout  # a literal keeps single backticks


def test_the_agent_says_its_version_without_the_pipeline():
    import subprocess
    import sys

    from tests.conftest import run_cli

    ours = run_cli("--version", timeout=600)
    script = ("import sys\nfrom edgeslim.deploy.agent.device import main\ntry:\n    main(['--version'])\n"
              "except SystemExit as e:\n    code = e.code\n"
              "heavy = sorted({'torch', 'mlflow', 'kfp', 'edgeslim.pipelines', 'edgeslim.plugins'} & set(sys.modules))\n"
              "print('loaded:', heavy, 'exit:', code)")
    agent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert ours.returncode == 0 and agent.returncode == 0, agent.stderr
    version = ours.stdout.split()[-1]
    assert ours.stdout.strip() == f"edgeslim {version}"
    assert agent.stdout.splitlines() == [f"edgeslim-agent {version}", "loaded: [] exit: 0"]


@pytest.mark.parametrize("doc, shown", [
    ("the store: ``--store`` or ``$X``", "the store: `--store` or `$X`"),
    ("A :class:`~edgeslim.deploy.controller.Controller` for it", "A `Controller` for it"),
    ("see :func:`edgeslim.deploy.trust.load_root`", "see `edgeslim.deploy.trust.load_root`"),
    ("On disk::\n\n    objects/", "On disk:\n\n    objects/"),
    (None, ""),
])
def test_plain_drops_rest_markup(doc, shown):
    assert plain(doc) == shown
