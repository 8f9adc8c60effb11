"""Every argparse parser below a command line, for the tests that read them (help text, the CLI reference)."""

from __future__ import annotations

import argparse


def walk(parser: argparse.ArgumentParser, path: str):
    """(command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
