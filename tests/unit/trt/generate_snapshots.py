"""Write tests/unit/trt/snapshots/tensorrt-<version>.json from the real TensorRT Python bindings.

    python tests/unit/trt/generate_snapshots.py [--oss-repo PATH]

For each version in harness.BINDINGS: download its bindings wheel from PyPI, load
it over stub libraries and record its API (introspect.py). The mocked
``tensorrt`` of the unit tests is generated from these files, and
tests/unit/test_trt_conformance.py checks they still equal the real bindings, so
neither can grow an attribute TensorRT does not have.

TensorRT 8.5 (Xavier, JetPack 5.1) was never on PyPI. Its snapshot is the 8.6.1
one minus what 8.6 added to the Python API, read from the pybind sources of
TensorRT OSS (github.com/NVIDIA/TensorRT, tags 8.5.2 and v8.6.1) with
``--oss-repo`` pointing at a clone; without it the delta recorded in the
existing 8.5 snapshot is applied again.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

_DECL = re.compile(r'py::(?:enum_|class_)<.*?>\s*\(\s*\w+\s*,\s*"(\w+)"', re.S)
_MEMBER = re.compile(r'\.(?:value|def|def_property|def_property_readonly|def_readwrite|def_readonly|def_static)'
                     r'\s*\(\s*"(\w+)"')


def pybind_api(repo: Path, rev: str) -> dict[str, set[str]]:
    """Enum and class name -> member names, as the pybind sources of TensorRT OSS declare them at ``rev``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    api: dict[str, set[str]] = {}
    for path in git("ls-tree", "-r", "--name-only", rev, "python/src").split():
        if not path.endswith((".cpp", ".h")):
            continue
        text = git("show", f"{rev}:{path}")
        marks = sorted([(m.start(), "decl", m.group(1)) for m in _DECL.finditer(text)]
                       + [(m.start(), "member", m.group(1)) for m in _MEMBER.finditer(text)])
        current = None
        for _, kind, name in marks:
            if kind == "decl":
                current = name
                api.setdefault(name, set())
            elif current is not None:
                api[current].add(name)
    return api


def source_delta(repo: Path) -> dict:
    """What the Python API of 8.6 has that 8.5's does not: new enums/classes, new members of old ones."""
    old, new = pybind_api(repo, "8.5.2"), pybind_api(repo, "v8.6.1")
    gone = {k: sorted(old[k] - new.get(k, set())) for k in old if old[k] - new.get(k, set())}
    if gone or set(old) - set(new):
        print(f"note: 8.6 removed {sorted(set(old) - set(new))} {gone}; the 8.5 snapshot cannot hold them",
              file=sys.stderr)
    return {"new": sorted(set(new) - set(old)),
            "members": {k: sorted(new[k] - old[k]) for k in sorted(new) if k in old and new[k] - old[k]}}


def write(version: str, snap: dict, source: str, **extra) -> None:
    path = harness.snapshot_path(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": source, **extra, **snap}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oss-repo", type=Path, help="a clone of github.com/NVIDIA/TensorRT (for the 8.5 delta)")
    args = ap.parse_args(argv)
    snaps = {}
    for version, (requirement, major) in harness.BINDINGS.items():
        snaps[version] = harness.prepare(version).run("snapshot")
        write(version, snaps[version], f"{requirement} from PyPI, imported over stub libnvinfer.so.{major} "
                                       "(tests/unit/trt/harness.py)")
    if args.oss_repo:
        delta = source_delta(args.oss_repo)
    else:
        delta = harness.load_snapshot(harness.DOCUMENTED)["delta_from_8.6.1"]
    write(harness.DOCUMENTED, harness.derive_documented(snaps[harness.DOCUMENTED_FROM], delta),
          "documented API, not an import: TensorRT 8.5 is not on PyPI. The 8.6.1 bindings' snapshot minus "
          "what the TensorRT OSS pybind sources add between tags 8.5.2 and v8.6.1 (delta_from_8.6.1)",
          **{"delta_from_8.6.1": delta})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
