"""The package as users get it: built, checked, installed from the wheel, and run.

`python -m build` builds the sdist from a copy of the checkout and the wheel from that sdist (so
the sdist is complete), with the setuptools of this environment (`--no-isolation`: nothing is
downloaded). `twine check --strict` reads both. The wheel must hold every module of the packages
pyproject.toml lists, their data files, the entry points, the LICENSE and no tests.

Then the wheel, not the checkout, is installed (`pip install --no-deps`) into a fresh venv that sees
this environment's packages (torch, mlflow, kfp ...), and its own `edgeslim` runs `--version`,
`init` for a model registered on the session's `mlflow server`, and `run` with the recipe `init`
wrote, as written. The run's Kubeflow tasks are subprocesses of the venv's python, so the whole
pipeline runs from the wheel.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import site
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeslim.components.common.version import __version__
from tests.conftest import REPO, run_process

pytestmark = pytest.mark.slow

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# A fresh clone holds what git tracks: leave out what .gitignore names (a venv, builds, MLflow files).
IGNORED = [".git", *(ln.strip().rstrip("/") for ln in (REPO / ".gitignore").read_text().splitlines()
                     if ln.strip() and not ln.startswith("#"))]


def _clean_env(venv: Path | None = None) -> dict[str, str]:
    """This environment, without what points Python at the checkout; ``venv``'s bin first, as if activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore", PIP_NO_INDEX="1")
    if venv is not None:
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    return env


def _ok(proc, what: str):
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built from a copy of the checkout."""
    root = tmp_path_factory.mktemp("package")
    checkout, out = root / "checkout", root / "dist"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(*IGNORED))
    _ok(run_process([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(checkout)],
                    timeout=900, env=_clean_env()), "python -m build")
    built = {"sdist": sorted(out.glob("*.tar.gz")), "wheel": sorted(out.glob("*.whl"))}
    assert [p.name for p in built["sdist"]] == [f"edgeslim-{__version__}.tar.gz"], built
    assert [p.name for p in built["wheel"]] == [f"edgeslim-{__version__}-py3-none-any.whl"], built
    return {kind: paths[0] for kind, paths in built.items()}


def test_twine_check_passes_on_the_sdist_and_the_wheel(dists):
    proc = _ok(run_process([sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]),
                            str(dists["wheel"])], timeout=300, env=_clean_env()), "twine check")
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_the_wheel_holds_the_modules_data_entry_points_and_license_and_no_tests(dists):
    setuptools_cfg = PROJECT["tool"]["setuptools"]
    folders = {pkg: REPO / folder for pkg, folder in setuptools_cfg["package-dir"].items()}
    expected = set()
    for pkg in setuptools_cfg["packages"]:
        top = max((p for p in folders if pkg == p or pkg.startswith(p + ".")), key=len)
        folder = folders[top].joinpath(*pkg[len(top):].split(".")[1:])
        expected |= {"/".join([*pkg.split("."), f.name]) for f in folder.glob("*.py")}
        for pattern in setuptools_cfg["package-data"].get(pkg, []):
            expected |= {"/".join([*pkg.split("."), *f.relative_to(folder).parts])
                         for f in folder.glob(pattern) if f.is_file()}
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        info = f"edgeslim-{__version__}.dist-info"
        meta = whl.read(f"{info}/METADATA").decode()
        license_text = whl.read(f"{info}/licenses/LICENSE")
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.optionxform = str  # names keep their case
        entry_points.read_string(whl.read(f"{info}/entry_points.txt").decode())
    package_files = {n for n in names if not n.startswith(info)}
    assert package_files == expected, (f"missing from the wheel: {sorted(expected - package_files)}; "
                                       f"not expected: {sorted(package_files - expected)}")
    assert not [n for n in names if "tests" in n.split("/") or n.split("/")[-1].startswith("test_")]
    assert license_text == (REPO / "LICENSE").read_bytes()
    assert f"\nVersion: {__version__}\n" in meta
    assert "\nLicense-Expression: Apache-2.0\n" in meta and "\nLicense-File: LICENSE\n" in meta
    groups = {g: {k: v.strip() for k, v in entry_points[g].items()} for g in entry_points.sections()}
    assert groups.pop("console_scripts") == PROJECT["project"]["scripts"]
    assert groups == PROJECT["project"]["entry-points"]
    assert {"edgeslim.tasks", "edgeslim.datasets", "edgeslim.stages", "mlflow.deployments"} <= set(groups)


def test_the_sdist_holds_the_license_readme_and_pyproject(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        names = set(sdist.getnames())
        top = f"edgeslim-{__version__}"
        pkg_info = sdist.extractfile(f"{top}/PKG-INFO").read().decode()
    assert {f"{top}/LICENSE", f"{top}/README.md", f"{top}/pyproject.toml"} <= names
    assert f"\nVersion: {__version__}\n" in pkg_info


@pytest.fixture(scope="module")
def wheel_venv(dists, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable), seeing this environment's packages."""
    venv = tmp_path_factory.mktemp("wheel-install") / "venv"
    env = _clean_env()
    # --without-pip: this environment's pip installs into it (`pip --python`), seconds faster than ensurepip.
    _ok(run_process([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                    timeout=600, env=env), "python -m venv")
    # --system-site-packages reaches the base interpreter's packages; when this one is itself a venv,
    # its own site-packages (where the test extra may be installed) comes right after the new venv's.
    # The wheel's edgeslim, in the new venv's site-packages, is found before any other: an editable
    # install's finder only answers what the path search did not find (the next test checks it).
    new_site = next((venv / "lib").glob("python3*/site-packages"))
    (new_site / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --force-reinstall: an edgeslim of the same version seen outside the venv must not satisfy it.
    _ok(run_process([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                     "--no-deps", "--force-reinstall", str(dists["wheel"])], timeout=600, env=env),
        "pip install the wheel")
    return venv


def test_the_venv_runs_the_wheel_not_the_checkout(wheel_venv, tmp_path):
    probe = ("import importlib.metadata as m, edgeslim\n"
             "d = m.distribution('edgeslim')\n"
             "print(edgeslim.__file__); print(d.locate_file('')); print(d.version); print(edgeslim.__version__)\n"
             "print(sorted(e.name for e in m.entry_points(group='edgeslim.tasks')))")
    out = _ok(run_process([str(wheel_venv / "bin" / "python"), "-c", probe], timeout=300, cwd=tmp_path,
                          env=_clean_env(wheel_venv)), "import edgeslim").stdout.splitlines()
    module, dist_dir, dist_version, module_version, tasks = out
    assert Path(module).resolve().is_relative_to(wheel_venv.resolve()), module
    assert Path(dist_dir).resolve().is_relative_to(wheel_venv.resolve()), dist_dir
    assert dist_version == module_version == __version__
    assert tasks == str(["classification", "detection", "segmentation"])
    assert not list((wheel_venv / "lib").glob("python3*/site-packages/__editable__*"))


def test_the_installed_commands_init_and_run_a_registered_classifier(wheel_venv, mlflow_server, registered_teacher,
                                                                     digits, tmp_path):
    env, bin_ = _clean_env(wheel_venv), wheel_venv / "bin"
    version = _ok(run_process([str(bin_ / "edgeslim"), "--version"], timeout=300, cwd=tmp_path, env=env),
                  "edgeslim --version")
    assert version.stdout.strip() == f"edgeslim {__version__}"

    np.savez(tmp_path / "digits.npz", **{f"{xy}_{split}": getattr(digits, f"{xy}_{split}")
                                         for xy in "xy" for split in ("train", "val", "test")})
    _ok(run_process([str(bin_ / "edgeslim"), "init", "--source", registered_teacher, "--npz", "digits.npz",
                     "--tracking-uri", mlflow_server.uri, "-o", "recipe.yaml"], timeout=600, cwd=tmp_path, env=env),
        "edgeslim init")
    run = run_process([str(bin_ / "edgeslim"), "run", "recipe.yaml", "--tracking-uri", mlflow_server.uri,
                       "--workdir", "out"], timeout=1800, cwd=tmp_path, env=env)
    _ok(run, "edgeslim run")

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gate"]["passed"] is True, report["gate"]
    registered = report["registered"]
    assert registered["name"] == "tiny-teacher-edge" and registered["alias"] == "edge-candidate"
    from mlflow import MlflowClient

    mv = MlflowClient(mlflow_server.uri).get_model_version_by_alias("tiny-teacher-edge", "edge-candidate")
    assert mv.version == registered["version"]
    assert mv.tags["edgeslim.version"] == __version__
