"""The documentation's commands, as the tests read them: every fenced shell or Python block in
``docs/**/*.md`` and ``README.md`` carries a marker on the line before it, either

    <!-- run: NAME -->            a test executes this block: it calls ``doc_block(PAGE, NAME)``
    <!-- not-run: REASON -->      it cannot run here, and the reason says why (a cluster, a GPU)

so a documented command is either executed against real servers on loopback or says why not.
``tests/unit/test_docs_blocks.py`` checks that every block is marked and that every ``run:`` name is used
by a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = {"bash", "sh", "shell", "console", "python", "py"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)[^\n]*$")
_MARK = re.compile(r"^\s*<!--\s*(?P<kind>run|not-run):\s*(?P<value>.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str        # path relative to the repository root
    line: int        # 1-based line of the opening fence
    lang: str
    text: str
    kind: str        # "run", "not-run" or "" (unmarked)
    value: str       # the run name or the reason


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in a language the marker rule covers."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, indent = m["fence"], m["lang"].lower(), len(m["indent"])
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = "\n".join(ln[indent:] if ln[:indent].isspace() else ln for ln in lines[i + 1:j])
        if lang in LANGUAGES:
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            mark = _MARK.match(lines[k]) if k >= 0 else None
            out.append(Block(str(page.relative_to(REPO)), i + 1, lang, body + "\n",
                             mark["kind"] if mark else "", mark["value"] if mark else ""))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in pages() for b in blocks(p)]


def doc_block(page: str, name: str) -> str:
    """The text of the block marked ``<!-- run: NAME -->`` on ``page`` (relative to the repository root,
    e.g. ``docs/registry-trigger.md``), exactly as a reader would copy it."""
    found = [b for b in blocks(REPO / page) if b.kind == "run" and b.value == name]
    if len(found) != 1:
        raise LookupError(f"{page}: {len(found)} blocks marked <!-- run: {name} -->; expected one")
    return found[0].text
