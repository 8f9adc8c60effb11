"""Where the suite's time goes, from a JUnit XML report: the tables in tests/README.md.

    python -m pytest --junitxml=/tmp/junit.xml      # the whole suite, or any part of it
    python tests/durations.py /tmp/junit.xml [--top 15]

Prints Markdown: the time per folder and per file (setup, call and teardown together, as
pytest's --durations counts them), and the slowest tests. Under ``pytest -n`` the times are
each test's own, in whichever worker ran it: they add up to more than the wall time.
"""

from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def read(path: str) -> list[tuple[str, str, float, str]]:
    """(file, test name, seconds, outcome) for every test case in the report."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.unit.test_x[.TestClass]
        i = next((k for k, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
        file = "/".join(parts[: i + 1]) + ".py"
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        rows.append((file, case.get("name", ""), float(case.get("time", 0.0)), outcome))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("junit")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    rows = read(args.junit)
    total = sum(r[2] for r in rows)
    folders: dict[str, float] = collections.Counter()
    files: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for file, _, sec, _ in rows:
        folders["/".join(file.split("/")[:2])] += sec
        files[file] += sec
        counts[file] += 1
    print(f"{len(rows)} tests, {total / 60:.1f} min of test time\n")
    print("| folder | minutes | share |\n|---|---:|---:|")
    for name, sec in sorted(folders.items(), key=lambda kv: -kv[1]):
        print(f"| `{name}` | {sec / 60:.1f} | {100 * sec / total:.0f} % |")
    print("\n| file | tests | minutes |\n|---|---:|---:|")
    for name, sec in sorted(files.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| `{name}` | {counts[name]} | {sec / 60:.1f} |")
    print(f"\n| slowest {args.top} tests | seconds |\n|---|---:|")
    for file, name, sec, outcome in sorted(rows, key=lambda r: -r[2])[: args.top]:
        print(f"| `{file}::{name}`{'' if outcome == 'passed' else f' ({outcome})'} | {sec:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
