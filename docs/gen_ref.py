"""The generated pages of the docs site, so that they cannot drift from the code.

- The recipe reference, from the config dataclasses: the recipe's sections (``components/recipe.py``), every
  stage method registered under ``edgeslim.stages``, every task registered under ``edgeslim.tasks`` and the
  ``engines:`` section. Each key's type and default come from the dataclass field, its meaning from the
  ``Attributes:`` section of the class docstring (a base class's docstring documents inherited fields).
- The CLI reference, from the argparse parsers: ``edgeslim`` with every subcommand (``build_parser`` in
  ``src/edgeslim/cli.py``, which gathers ``fleet``, ``engine`` and ``bench``), ``edgeslim-agent``, and the
  ``-C`` settings of ``mlflow deployments -t edge``.

MkDocs runs this file as a hook (``hooks:`` in mkdocs.yml): a page line ``<!-- reference: recipe -->`` or
``<!-- reference: cli -->`` is replaced by the generated Markdown when the site is built.
``python docs/gen_ref.py recipe|cli`` prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
from contextlib import contextmanager
from unittest import mock

MARKER = re.compile(r"^<!-- reference: (?P<name>[\w-]+) -->$", re.M)
_ROLE = re.compile(r":(?:class|mod|data|func|meth|attr):`~?(?:[\w.]+\.)?([\w]+)`")


def _markdown(text: str) -> str:
    """Docstring text as Markdown: ``code`` to `code`, Sphinx roles to their last name, one line."""
    text = _ROLE.sub(r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


# --- the recipe reference ----------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Each field's text from the ``Attributes:`` sections of ``cls`` and its bases (the nearest wins)."""
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        doc = inspect.cleandoc(vars(klass).get("__doc__") or "")
        lines = doc.splitlines()
        if "Attributes:" not in lines:
            continue
        start = lines.index("Attributes:") + 1
        name, indent = None, None
        own: dict[str, list[str]] = {}
        for line in lines[start:]:
            if not line.strip():
                continue
            depth = len(line) - len(line.lstrip())
            if indent is None:
                indent = depth
            if depth < indent:
                break
            m = re.match(r"(\w+): (.*)$", line.strip())
            if depth == indent and m:
                name = m[1]
                own[name] = [m[2]]
            elif name is not None:
                own[name].append(line.strip())
        for key, words in own.items():
            docs.setdefault(key, _markdown(" ".join(words)))
    return docs


def _config_class(tp: typing.Any) -> type | None:
    from edgeslim.components.common.config import Config

    return tp if isinstance(tp, type) and issubclass(tp, Config) else None


def _unwrap(tp: typing.Any) -> tuple[typing.Any, bool, bool]:
    """``(inner type, optional, list)``: ``X | None`` and ``list[X]`` unwrapped once each."""
    optional = is_list = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            tp = args[0]
    if typing.get_origin(tp) is list and _config_class(typing.get_args(tp)[0]):
        tp, is_list = typing.get_args(tp)[0], True
    return tp, optional, is_list


def _type_name(tp: typing.Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a) if not isinstance(a, str) else a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is typing.Any:
        return "any"
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    return f"`{json.dumps(value)}`"


def _anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def config_sections(path: str, cls: type, title: str = "", anchor: str = "", also: tuple[str, ...] = ()) -> list[str]:
    """A section for ``cls`` at the dotted key ``path`` (``also``: other keys with the same section), then one
    per nested config section, depth first. Fields come in the order the nearest docstring lists them."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    anchor = anchor or _anchor(path)
    summary = _markdown(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0])
    keys = ", ".join(f"`{p}`" for p in (path, *also))
    out = [f"### {title or keys} {{#{anchor}}}", "", summary, "",
           "| key | type | default | meaning |", "|---|---|---|---|"]
    nested: dict[type, list[str]] = {}
    order = list(docs)
    fields = sorted((f for f in dataclasses.fields(cls) if f.init),
                    key=lambda f: order.index(f.name) if f.name in order else len(order))
    for f in fields:
        inner, optional, is_list = _unwrap(hints[f.name])
        child = _config_class(inner)
        if child is not None:
            sub = f"{path}.{f.name}" + ("[]" if is_list else "")
            nested.setdefault(child, []).append(sub)
            target = f"{anchor}-{_anchor(nested[child][0].rsplit('.', 1)[1])}"
            kind = f"[{'list of sections' if is_list else 'section'}](#{target})"
            type_text, default = kind + (" or `null`" if optional else ""), "see below"
        else:
            type_text, default = _type_name(hints[f.name]), _default(f)
        if f.name not in docs:
            raise LookupError(f"{cls.__module__}.{cls.__qualname__}: field {f.name!r} has no text in an "
                              "Attributes: section of its docstring (or a base's); document it there")
        out.append(f"| `{f.name}` | {type_text} | {default} | {docs[f.name]} |")
    out.append("")
    for child, subs in nested.items():
        out += config_sections(subs[0], child, anchor=f"{anchor}-{_anchor(subs[0].rsplit('.', 1)[1])}",
                               also=tuple(subs[1:]))
    return out


def recipe_reference() -> str:
    from edgeslim.components.common.config import STAGES
    from edgeslim.components.common.tasks import TASKS
    from edgeslim.components.recipe import Recipe

    hints = typing.get_type_hints(Recipe)
    docs = field_docs(Recipe)
    out = ["## Top level {#top-level}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    sections: list[str] = []
    from edgeslim.components.recipe import _TOP_KEYS

    for f in sorted(dataclasses.fields(Recipe), key=lambda f: _TOP_KEYS.index(f.name)):
        inner, _, _ = _unwrap(hints[f.name])
        if f.name == "stages":
            type_text, default = "[list of stages](#stages)", "`[{quantize: {}}]`"
        elif f.name == "task":
            type_text, default = "[section](#task)", "`classification`"
        elif _config_class(inner):
            type_text, default = f"[section](#{_anchor(f.name)})", "see below"
            sections += config_sections(f.name, inner)
        else:
            type_text, default = _type_name(hints[f.name]), _default(f)
        if f.name not in docs:
            raise LookupError(f"Recipe: field {f.name!r} has no text in its docstring's Attributes: section")
        out.append(f"| `{f.name}` | {type_text} | {default} | {docs[f.name]} |")
    out += ["", "## Sections {#sections}", ""] + sections

    out += ["## Stages {#stages}", "",
            "`stages:` is a list; each entry is one stage, `- STAGE: {method: METHOD, ...}`. A stage without "
            "`method` gets its default method. The registered stage methods (entry-point group `edgeslim.stages`):",
            ""]
    by_stage: dict[str, list[str]] = {}
    for name in STAGES.names():
        by_stage.setdefault(name.partition(".")[0], []).append(name)
    order = ["distill", "prune", "export", "quantize"]
    for stage in sorted(by_stage, key=lambda s: (order.index(s) if s in order else len(order), s)):
        for name in sorted(by_stage[stage], key=lambda n: (not vars(STAGES.get(n)).get("is_default", False), n)):
            cls = STAGES.get(name)
            default = " (the default method)" if vars(cls).get("is_default", False) and len(by_stage[stage]) > 1 else ""
            out += config_sections(stage, cls, title=f"`{stage}`, `method: {cls.method}`{default}",
                                   anchor=f"stages-{stage}-{cls.method}")

    out += ["## Task {#task}", "",
            "`task:` says what kind of model the recipe compresses: `task: {kind: KIND, ...}` (a bare `task: KIND` "
            "also works; no `task:` means `classification`). The registered tasks (entry-point group "
            "`edgeslim.tasks`):", ""]
    for kind in TASKS.names():
        cls = TASKS.get(kind).config_class
        out += config_sections("task", cls, title=f"`kind: {kind}`", anchor=f"task-{_anchor(kind)}")
    return "\n".join(out).rstrip() + "\n"


# --- the CLI reference -------------------------------------------------------------------------------------

@contextmanager
def _stable_defaults():
    """Defaults that do not depend on the machine building the docs: a fixed terminal width for usage
    lines, no ``EDGESLIM_*`` settings from the environment, and the host name as words."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("EDGESLIM_") or k == "MLFLOW_TRACKING_URI"]:
            del os.environ[key]
        os.environ["COLUMNS"] = "100"
        with mock.patch("socket.gethostname", return_value="<this host's name>"):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _arg_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if not action.choices else "{" + ",".join(action.choices) + "}")
    return f"{names} `{metavar}`"


def _arg_help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:
        params = {**vars(action), "prog": prog}
        params = {k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in params.items()}
        text = text % params
    extra = []
    if action.choices and action.option_strings and not action.metavar:
        pass  # the choices are in the argument's name
    elif action.choices:
        extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if isinstance(action, argparse._AppendAction):
        extra.append("repeatable")
    if action.required and action.option_strings:
        extra.append("required")
    default = action.default
    if (action.option_strings and action.nargs != 0 and default not in (None, argparse.SUPPRESS, [], "")
            and "%(default)" not in (action.help or "")):
        extra.append(f"default `{default}`")
    words = _markdown(text)
    return "; ".join([w for w in [words] if w] + extra) or "—"


def _parser_sections(parser: argparse.ArgumentParser, name: str, summary: str, level: int) -> list[str]:
    out = [f"{'#' * level} `{name}` {{#{_anchor(name)}}}", ""]
    description = parser.description or ""
    if summary:
        out += [_markdown(summary), ""]
    if description and _markdown(description) != _markdown(summary):
        if parser.formatter_class is argparse.RawDescriptionHelpFormatter:
            out += ["```text", inspect.cleandoc(description), "```", ""]
        else:
            out += [_markdown(description), ""]
    out += ["```text", parser.format_usage().strip(), "```", ""]
    rows, subcommands = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            subcommands = [(cmd, sub, helps.get(cmd, "")) for cmd, sub in action.choices.items()]
            continue
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        rows.append(f"| {_arg_name(action)} | {_arg_help(action, parser.prog)} |")
    if rows:
        out += ["| argument | meaning |", "|---|---|", *rows, ""]
    if subcommands:
        out += ["| command | what it does |", "|---|---|"]
        out += [f"| [`{cmd}`](#{_anchor(f'{name} {cmd}')}) | {_markdown(text) or '—'} |" for cmd, _, text in subcommands]
        out.append("")
        for cmd, sub, text in subcommands:
            out += _parser_sections(sub, f"{name} {cmd}", text, min(level + 1, 4))
    return out


def cli_reference() -> str:
    with _stable_defaults():
        from edgeslim.cli import build_parser
        from edgeslim.deploy.agent.device import build_parser as agent_parser

        out = _parser_sections(build_parser(), "edgeslim", "", 2)
        out += _parser_sections(agent_parser(), "edgeslim-agent", "", 2)
    try:
        from edgeslim.plugins.mlflow_deploy import target_help
    except ModuleNotFoundError:  # mlflow is not installed: the pipeline extra brings it
        help_text = "Install `edgeslim[pipeline]` to see this: `mlflow deployments help -t edge`."
    else:
        help_text = "```text\n" + target_help().rstrip() + "\n```"
    out += ["## `mlflow deployments -t edge:/FLEET` {#mlflow-deployments-edge}", "",
            "edgeslim registers the MLflow deployment target `edge` (entry point `edge` of the group "
            "`mlflow.deployments`). `mlflow deployments help -t edge` prints this:", "", help_text, ""]
    return "\n".join(out).rstrip() + "\n"


GENERATORS = {"recipe": recipe_reference, "cli": cli_reference}


def expand(markdown: str) -> str:
    """``markdown`` with every ``<!-- reference: NAME -->`` line replaced by the generated reference."""
    def replace(m: re.Match) -> str:
        if m["name"] not in GENERATORS:
            raise LookupError(f"<!-- reference: {m['name']} -->: no such reference; "
                              f"known: {', '.join(GENERATORS)}")
        return GENERATORS[m["name"]]()
    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """The MkDocs hook: generated references go into the pages that ask for them."""
    return expand(markdown)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GENERATORS:
        sys.exit(f"usage: python docs/gen_ref.py {'|'.join(GENERATORS)}")
    sys.stdout.write(GENERATORS[sys.argv[1]]())
