"""Documented means tested: every shell or Python block in the docs is executed by a test, or says why
it cannot run here (tests/docs_blocks.py)."""

from __future__ import annotations

from collections import Counter

from tests.docs_blocks import REPO, all_blocks


def _test_sources() -> str:
    return "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py") if p.name != "docs_blocks.py")


def test_every_documented_block_is_run_or_says_why_not():
    unmarked = [f"{b.page}:{b.line} ({b.lang})" for b in all_blocks() if not b.kind]
    assert not unmarked, ("blocks with no <!-- run: NAME --> or <!-- not-run: REASON --> on the line before:\n"
                          + "\n".join(unmarked))
    vague = [f"{b.page}:{b.line}" for b in all_blocks() if b.kind == "not-run" and len(b.value.split()) < 2]
    assert not vague, "not-run blocks whose reason is not a reason:\n" + "\n".join(vague)


def test_every_run_block_is_executed_by_a_test():
    sources = _test_sources()
    names = Counter((b.page, b.value) for b in all_blocks() if b.kind == "run")
    twice = [f"{page}: {name}" for (page, name), n in names.items() if n > 1]
    assert not twice, "run names used twice on a page:\n" + "\n".join(twice)
    unused = [f"{page}: {name}" for page, name in names
              if f'"{name}"' not in sources and f"'{name}'" not in sources]
    assert not unused, "blocks marked run that no test reads with doc_block:\n" + "\n".join(unused)


def test_the_reader_finds_marked_blocks(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Intro\n\n<!-- run: hello -->\n```bash\necho hi\n```\n\n<!-- not-run: needs a GPU node -->\n"
                    "```python\nimport tensorrt\n```\n\n```text\nnot a command\n```\n\n```bash\nls\n```\n")
    from tests import docs_blocks

    orig = docs_blocks.REPO
    try:
        docs_blocks.REPO = tmp_path
        got = docs_blocks.blocks(page)
    finally:
        docs_blocks.REPO = orig
    assert [(b.lang, b.kind, b.value, b.text) for b in got] == [
        ("bash", "run", "hello", "echo hi\n"), ("python", "not-run", "needs a GPU node", "import tensorrt\n"),
        ("bash", "", "", "ls\n")]
