"""tests/durations.py, which makes tests/README.md's timing tables from a JUnit report."""

from __future__ import annotations

from tests import durations

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
  <testcase classname="tests.unit.test_a" name="test_fast" time="1.5" />
  <testcase classname="tests.unit.test_a.TestGroup" name="test_in_a_class" time="4.5" />
  <testcase classname="tests.integration.fleet.test_b" name="test_slow[x]" time="54.0" />
  <testcase classname="tests.integration.fleet.test_b" name="test_skipped" time="0.0"><skipped message="no GPU" /></testcase>
</testsuite></testsuites>
"""


def test_tables_per_folder_per_file_and_the_slowest_tests(tmp_path, capsys):
    path = tmp_path / "junit.xml"
    path.write_text(REPORT)
    assert durations.main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 tests, 1.0 min of test time")
    assert "| `tests/integration` | 0.9 | 90 % |" in out and "| `tests/unit` | 0.1 | 10 % |" in out
    # a test inside a class counts for its file
    assert "| `tests/unit/test_a.py` | 2 | 0.1 |" in out
    slowest = out.split("| slowest 2 tests | seconds |")[1]
    assert slowest.index("test_b.py::test_slow[x]` | 54") < slowest.index("test_a.py::test_in_a_class` | 4")
    assert "test_fast" not in slowest
