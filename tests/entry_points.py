"""Entry points of a package that is not installed, for one test: what another team's package would register.

edgeslim finds tasks, data providers, calibrators, device classes and the rest through entry-point
groups (``components/common/registry.py``). To test that an entry point from *another* distribution
is found, :func:`install_entry_points` writes a tiny distribution into ``tmp_path`` and puts it on
``sys.path`` for the test, which is all ``importlib.metadata`` needs to see it::

    from tests.entry_points import install_entry_points

    def test_a_board_from_another_package_is_found(tmp_path, monkeypatch):
        install_entry_points(tmp_path, monkeypatch,
                             {"edgeslim.device_classes": {"lab-sm87-trt10.3": "lab_boards:LAB"}},
                             modules={"lab_boards.py": "LAB = ..."})
        monkeypatch.setattr(devices, "DEVICE_CLASSES", Registry("edgeslim.device_classes", "device class"))
        assert devices.get_device_class("lab-sm87-trt10.3") ...

A ``Registry`` reads its group once, on first use: give the test a fresh one (``monkeypatch.setattr``
the module's registry) so that it sees the new entries. When the test ends, monkeypatch takes the
folder off ``sys.path`` and the modules written here out of ``sys.modules``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def install_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, groups: dict[str, dict[str, str]],
                         modules: dict[str, str] | None = None, *, dist: str = "fake-pkg",
                         version: str = "0.1") -> Path:
    """Make ``groups`` the entry points of the distribution ``dist``, on ``sys.path`` for this test.

    Args:
        tmp_path: the test's ``tmp_path``; the distribution goes into ``tmp_path / "site"``.
        monkeypatch: the test's ``monkeypatch``; everything is undone when the test ends.
        groups: entry-point group -> {name: ``"module:attribute"``}, as in ``[project.entry-points]``.
        modules: file name (relative, ``"pkg/mod.py"`` for a package) -> source, written beside the
            ``.dist-info`` folder so that the entry points' targets import.
        dist: the distribution's name (its ``.dist-info`` folder is ``<dist, - as _>-<version>``).
        version: its version.

    Returns:
        The ``site`` folder put first on ``sys.path``.
    """
    site = tmp_path / "site"
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    names: set[str] = set()
    for rel, source in (modules or {}).items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        parts = Path(rel).with_suffix("").parts
        names |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[i - 1] != "__init__"}
    for name in sorted(names):
        # Out of sys.modules when the test ends, imported or not: the setitem notes it absent,
        # undone last (so it is deleted); the delitem leaves it absent for the test itself.
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(site))  # also clears importlib's caches, metadata's included
    return site
