"""The generated references of the docs site (docs/gen_ref.py) say what the code accepts: every recipe key of
every config class, every registered stage method and task, every command and option of the parsers. They
are generated when the site is built, so a new key, stage, task or option appears without an edit here."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import typing

import pytest

from tests.docs_blocks import REPO
from tests.parsers import walk


@pytest.fixture(scope="module")
def gen_ref():
    spec = importlib.util.spec_from_file_location("gen_ref", REPO / "docs" / "gen_ref.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config_keys(path: str, cls: type) -> list[str]:
    """Every dotted key of ``cls`` and its nested config sections."""
    from edgeslim.components.common.config import Config

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(f"{path}.{f.name}")
        for tp in (hints[f.name], *typing.get_args(hints[f.name])):
            if isinstance(tp, type) and issubclass(tp, Config):
                keys += _config_keys(f"{path}.{f.name}", tp)
    return keys


def test_the_recipe_reference_documents_every_key_of_every_section(gen_ref):
    from edgeslim.components.common.config import STAGES
    from edgeslim.components.common.tasks import TASKS
    from edgeslim.components.recipe import Recipe

    text = gen_ref.recipe_reference()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    classes = [Recipe] + [STAGES.get(n) for n in STAGES.names()] + [TASKS.get(k).config_class for k in TASKS.names()]
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            for key in _config_keys("", cls):
                assert key.rsplit(".", 1)[1] in rows, f"{cls.__name__}: {key} is not in the recipe reference"
    for name in STAGES.names():
        stage, method = name.split(".")
        assert f"{{#stages-{stage}-{method}}}" in text
    for kind in TASKS.names():
        assert f"{{#task-{kind}}}" in text


def test_a_stage_registered_by_a_plugin_appears_with_its_documented_keys(gen_ref):
    from edgeslim.components.common.config import STAGES, StageConfig

    @dataclasses.dataclass(frozen=True)
    class MagicPruneConfig(StageConfig):
        """Pruning by magic.

        Attributes:
            sparkle: how much magic.
        """

        stage = "prune"
        method = "magic"
        sparkle: float = 0.5

    STAGES.register("prune.magic", MagicPruneConfig)
    try:
        text = gen_ref.recipe_reference()
    finally:
        STAGES.unregister("prune.magic")
    assert "{#stages-prune-magic}" in text and "| `sparkle` | float | `0.5` | how much magic. |" in text


def test_an_undocumented_key_stops_the_build_naming_it(gen_ref):
    from edgeslim.components.common.config import STAGES, StageConfig

    @dataclasses.dataclass(frozen=True)
    class SilentPruneConfig(StageConfig):
        """Pruning without a word."""

        stage = "prune"
        method = "silent"
        quietness: int = 1

    STAGES.register("prune.silent", SilentPruneConfig)
    try:
        with pytest.raises(LookupError, match="field 'quietness' has no text"):
            gen_ref.recipe_reference()
    finally:
        STAGES.unregister("prune.silent")


def test_the_cli_reference_lists_every_command_and_option(gen_ref):
    from edgeslim.cli import build_parser
    from edgeslim.deploy.agent.device import build_parser as agent_parser

    text = gen_ref.cli_reference()
    for root, name in ((build_parser(), "edgeslim"), (agent_parser(), "edgeslim-agent")):
        for cmd, parser in walk(root, name):
            section = text.split(f"`{cmd}` {{#", 1)
            assert len(section) == 2, f"no section for {cmd}"
            body = section[1].split("\n#", 1)[0]
            for action in parser._actions:
                if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction,
                                                                           argparse._SubParsersAction)):
                    continue
                names = action.option_strings or [action.metavar or action.dest]
                assert all(f"`{n}`" in body for n in names), f"{cmd}: {names} missing"
    assert "mlflow deployments help -t edge" in text


def test_the_cli_reference_does_not_depend_on_the_machine(gen_ref, monkeypatch):
    monkeypatch.setenv("EDGESLIM_AGENT_STATE_DIR", "/somewhere/else")
    monkeypatch.setenv("COLUMNS", "40")
    text = gen_ref.cli_reference()
    assert "/somewhere/else" not in text and "`<this host's name>`" in text
    assert text == gen_ref.cli_reference()


def test_a_page_asks_for_a_reference_by_name(gen_ref):
    out = gen_ref.on_page_markdown("# CLI\n\n<!-- reference: cli -->\n", page=None, config=None, files=None)
    assert out.startswith("# CLI\n\n## `edgeslim` {#edgeslim}")
    with pytest.raises(LookupError, match="no such reference"):
        gen_ref.expand("<!-- reference: nothing -->")
