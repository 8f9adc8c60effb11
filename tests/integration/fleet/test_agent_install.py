"""An agent-only install: `pip install 'edgeslim[agent]'` in a fresh venv runs the device agent.

The venv holds the base dependencies only (numpy, onnxruntime, cryptography, pyyaml): no torch,
mlflow or kfp, and no boto3 or botocore, so its store speaks S3 through edgeslim's own
standard-library client (deploy/s3client.py). Its `edgeslim-agent` installs a model rolled out by
the controller of the full environment (which uses boto3) through a real S3 server (Ceph RGW on
loopback, see conftest.py): the light client end to end, signing, conditional polls, ranged
downloads and conditional status writes.

The TensorRT-only agent, `pip install 'edgeslim[agent-trt]'`, has no ONNX Runtime: its health check runs
engines through TensorRT (Polygraphy's runner; TensorRT comes with JetPack), and a release it cannot run
fails its check with the reason. Its venv is installed too, and its agent registers and idles.

Installed size (site-packages and bin; without the venv's own pip and setuptools) of both installs and
each idle agent's RSS are measured and printed side by side (`pytest -s`), not asserted: sizes and memory
vary by machine and platform (docs/benchmarks.md, "Device agent install", records the figures).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.fleet_it_helpers import REPO, make_onnx, wait_for
from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.store import FleetKeys

ORIN = "orin-sm87-jp6.1-trt10.3"
PIPELINE_ONLY = ("torch", "mlflow", "kfp", "onnx", "sklearn", "torch_pruning", "boto3", "botocore", "s3transfer")
# What `pip install` reads from the checkout; copied so the build writes no build/ or egg-info there.
SOURCE = ("pyproject.toml", "README.md", "LICENSE", "src", "components", "pipelines", "plugins", "deploy")


def _requirements(extra: str) -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra])


def test_the_test_extra_holds_the_pipeline_kubernetes_and_fleet_extras():
    # `test` repeats them rather than naming `edgeslim[pipeline,kubernetes]` (pip-compile would lock a file:// URL).
    assert _requirements("pipeline") | _requirements("kubernetes") | _requirements("fleet") <= _requirements("test")


def _clean_env() -> dict[str, str]:
    """The environment without anything that points Python at the full install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")


def _mb(path: Path) -> float:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
               .stdout.split()[0]) / 1e6


def _venv(tmp_path_factory, extra: str) -> Path:
    """A fresh venv with `pip install 'edgeslim[EXTRA]'` (not editable), at the locked versions."""
    root = tmp_path_factory.mktemp(f"{extra}-install")
    src, venv = root / "src", root / "venv"
    src.mkdir()
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=600)
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "tests" / "requirements.lock"),
                           f"{src}[{extra}]"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"pip install '.[{extra}]' failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return venv


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory) -> Path:
    """The default agent: `pip install 'edgeslim[agent]'` (ONNX Runtime for devices without TensorRT)."""
    return _venv(tmp_path_factory, "agent")


@pytest.fixture(scope="module")
def agent_trt_venv(tmp_path_factory) -> Path:
    """The TensorRT-only agent: `pip install 'edgeslim[agent-trt]'` (TensorRT itself comes with JetPack)."""
    return _venv(tmp_path_factory, "agent-trt")


# Run by the venv's python: each installed distribution's bytes on disk (its RECORD).
_DISTS = """
import json, re
from importlib import metadata
out = {}
for d in metadata.distributions():
    size = 0
    for f in d.files or []:
        p = f.locate()
        size += p.stat().st_size if p.is_file() else 0
    out[re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()] = {"bytes": size}
print(json.dumps(out))
"""


def _footprint(venv: Path) -> dict:
    """MB installed: all, without the venv's pip and setuptools, and the largest distributions."""
    site = next((venv / "lib").glob("python3.*/site-packages"))
    installed_mb = _mb(site) + _mb(venv / "bin")
    seeded = ("pip", "setuptools", "_distutils_hack", "pkg_resources")  # what `python -m venv` puts there
    seeded_mb = sum(_mb(p) for p in site.iterdir() if p.name.split("-")[0] in seeded)
    dists = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", _DISTS], capture_output=True, text=True,
                                      check=True, env=_clean_env()).stdout)
    ours = {n: d for n, d in dists.items() if n not in ("pip", "setuptools")}
    return {"installed": installed_mb, "no_pip": installed_mb - seeded_mb,
            "largest": sorted(((d["bytes"] / 1e6, n) for n, d in ours.items()), reverse=True)[:6]}


def _installed(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True,
                         text=True, check=True, env=_clean_env()).stdout
    return sorted(p["name"].lower() for p in json.loads(out))


@pytest.mark.slow
def test_agent_only_install_runs_the_agent_without_the_pipeline(agent_venv):
    env = _clean_env()
    helped = subprocess.run([str(agent_venv / "bin" / "edgeslim-agent"), "--help"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert helped.returncode == 0 and "usage: edgeslim-agent" in helped.stdout, helped.stderr
    for mod in PIPELINE_ONLY:
        probe = subprocess.run([str(agent_venv / "bin" / "python"), "-c", f"import {mod}"], capture_output=True,
                               text=True, env=env, timeout=600)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"{mod} is in the agent-only venv"
    # The main command's help and a fleet command that needs no MLflow work too; one that does says so in one line.
    cli = str(agent_venv / "bin" / "edgeslim")
    assert subprocess.run([cli, "--help"], capture_output=True, env=env, timeout=600).returncode == 0
    assert subprocess.run([cli, "fleet", "--help"], capture_output=True, env=env, timeout=600).returncode == 0
    compiled = subprocess.run([cli, "compile", "-o", str(agent_venv / "p.yaml")], capture_output=True, text=True,
                              env=env, timeout=600)
    assert compiled.returncode == 2 and compiled.stderr.strip().splitlines() == [
        "edgeslim: error: kfp is not installed; install it with: pip install 'edgeslim[pipeline]'"]
    packages = [p for p in _installed(agent_venv) if p not in ("pip", "setuptools")]
    print(f"\nagent-only venv: {len(packages)} packages besides pip and setuptools: {', '.join(packages)}")


@pytest.mark.slow
def test_agent_only_install_takes_a_rollout_from_the_controller(
        agent_venv, rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path):
    dev = agents("light0", ORIN, start=False)
    # The same flags as every fleet test's agent, run by the agent-only venv's entry point.
    assert dev.args[1:3] == ["-m", "edgeslim.deploy.agent.device"]
    dev.args = [str(agent_venv / "bin" / "edgeslim-agent")] + dev.args[3:]
    dev.env = _clean_env()  # the RGW credentials are in os.environ (the rgw fixture)
    chosen = subprocess.run([str(agent_venv / "bin" / "python"), "-c", "import sys; from edgeslim.deploy.store import "
                             f"open_store; print(open_store({s3_url!r}, endpoint_url={rgw['S3_ENDPOINT_URL']!r}).client,"
                             " sorted(m for m in sys.modules if m.startswith(('boto', 'urllib3'))))"],
                            capture_output=True, text=True, env=dev.env, timeout=600)
    assert chosen.stdout.split() == ["light", "[]"], chosen.stderr  # no boto3 here: edgeslim's own S3 client
    dev.start()
    wait_for(lambda: s3_store.get_json(FleetKeys("lab").registration("light0")), 60, "the light agent to register")
    assert dev.saw("S3 through edgeslim's own S3 client")
    keys.controller(s3_store).enrol("light0")

    onnx = make_onnx(tmp_path / "v1.onnx", seed=11)
    _, sha = register_edge_model("fleet-light", onnx)
    c = keys.controller(s3_store)
    rec = c.create("r1", "models:/fleet-light@edge-candidate", WaveRolloutConfig.from_strings(
        {"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "120"}))
    assert rec["state"] == "succeeded", json.dumps(rec, indent=2, default=str)
    assert rec["devices"]["light0"]["outcome"] == "committed"
    last = s3_store.get_json(FleetKeys("lab").status("light0"))[0]["signed"]["last"]
    assert last["result"] == "committed" and last["rollout_id"] == "r1"
    current = dev.state_dir / "current" / "model.onnx"
    assert hashlib.sha256(current.read_bytes()).hexdigest() == sha == hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert dev.saw("health check passed on onnxruntime")

    # Idle again: the health check's child has exited and the agent only polls.
    wait_for(lambda: dev.local_status().get("state") == "idle", 60, "the agent to go idle")
    status = Path(f"/proc/{dev.proc.pid}/status").read_text()
    rss_mb = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024
    f = _footprint(agent_venv)
    print(f"\nagent-only install, light S3 client (no boto3): {f['installed']:.0f} MB installed (site-packages + "
          f"bin; {f['no_pip']:.0f} MB without the venv's own pip and setuptools; largest: "
          + ", ".join(f"{n} {mb:.0f} MB" for mb, n in f["largest"]) + f"); idle agent RSS {rss_mb:.1f} MB")


def _idle_rss_mb(dev) -> float:
    wait_for(lambda: dev.local_status().get("state") == "idle", 60, "the agent to go idle")
    status = Path(f"/proc/{dev.proc.pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.slow
def test_tensorrt_only_install_has_no_onnxruntime_and_says_what_its_health_check_cannot_run(
        agent_trt_venv, agent_venv, s3_store, keys, agents, tmp_path):
    env = _clean_env()
    python = str(agent_trt_venv / "bin" / "python")
    for mod, present in (("onnxruntime", False), ("sympy", False), ("polygraphy", True), ("numpy", True)):
        probe = subprocess.run([python, "-c", f"import {mod}"], capture_output=True, text=True, env=env, timeout=600)
        assert (probe.returncode == 0) == present, f"{mod}: {probe.stderr[-300:]}"
    # A release without an engine (no TensorRT here either): the check fails and names the fix.
    release = tmp_path / "release"
    release.mkdir()
    make_onnx(release / "model.onnx", seed=3)
    checked = subprocess.run([python, "-m", "edgeslim.deploy.agent.health"], capture_output=True, text=True, env=env,
                             input=json.dumps({"release": str(release), "check": None}), timeout=600)
    result = json.loads(checked.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    assert checked.returncode == 1 and not result["ok"]
    assert result["error"].startswith("the release has no TensorRT engine; this agent has no ONNX Runtime")
    assert "install edgeslim[agent]" in result["error"]

    rss = {}
    for name, venv in (("agent", agent_venv), ("agent-trt", agent_trt_venv)):
        dev = agents(f"idle-{name}", ORIN, start=False)
        dev.args = [str(venv / "bin" / "edgeslim-agent")] + dev.args[3:]
        dev.env = _clean_env()
        dev.start()
        wait_for(lambda: s3_store.get_json(FleetKeys("lab").registration(dev.device_id)), 60, "the agent to register")
        keys.controller(s3_store).enrol(dev.device_id)
        rss[name] = _idle_rss_mb(dev)
        dev.stop()
    default, trt_only = _footprint(agent_venv), _footprint(agent_trt_venv)
    assert trt_only["no_pip"] < default["no_pip"]
    print(f"\ninstalled (site-packages + bin, without the venv's pip and setuptools) and idle agent RSS: "
          f"edgeslim[agent] {default['no_pip']:.0f} MB, {rss['agent']:.1f} MB; edgeslim[agent-trt] "
          f"{trt_only['no_pip']:.0f} MB (TensorRT itself comes with JetPack), {rss['agent-trt']:.1f} MB; largest in "
          "agent-trt: " + ", ".join(f"{n} {mb:.0f} MB" for mb, n in trt_only["largest"]) + " (target <= 120 MB)")
