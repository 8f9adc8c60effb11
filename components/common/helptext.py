"""Docstrings as command-line help: reST markup becomes plain terminal text.

A command's ``--help`` may take its description from a module docstring, which is written
in reST for the API docs. :func:`plain` keeps the words and drops the markup.
"""

from __future__ import annotations

import re

# :class:`~pkg.mod.Name` -> `Name`; :func:`pkg.fn` -> `pkg.fn`
_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
# ``literal`` -> `literal`
_LITERAL = re.compile(r"``(.+?)``", re.S)


def _role(m: re.Match) -> str:
    target = m.group(1).strip()
    return f"`{target.rsplit('.', 1)[-1] if '`~' in m.group(0) else target}`"  # ~ shows the last name only


def plain(text: str | None) -> str:
    """``text`` (a docstring) with reST roles and double-backtick literals in single backticks, and a
    line's closing ``::`` (a literal block follows) as one colon."""
    if not text:
        return ""
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(r"`\1`", text)
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
