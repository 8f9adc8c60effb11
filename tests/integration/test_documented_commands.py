"""Documented commands that need no model and no server, run as written in a fresh folder: the key
ceremony of docs/security.md, the device classes of docs/tensorrt.md, and docs/kubeflow.md's compile."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.doc_commands import run_bash
from tests.docs_blocks import REPO, doc_block

pytestmark = pytest.mark.slow


def test_the_key_ceremony_makes_four_roles_and_root_version_1(tmp_path):
    proc = run_bash(doc_block("docs/security.md", "keys"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("offline/root", "ci/release", "controller/fleet-signing", "approvers/approver"):
        assert (tmp_path / "keys" / f"{key}.key").is_file() and (tmp_path / "keys" / f"{key}.pub").is_file()
    from edgeslim.deploy import signing, trust

    root, _ = trust.load_root(tmp_path / "root.json")
    assert root.version == 1
    approver = signing.load_private_key(tmp_path / "keys" / "approvers" / "approver.key")
    assert root.roles["approver"].keyids == (signing.key_id(approver.public_key()),)
    published = tmp_path / "fleet-store" / "fleets" / "jetson-orin-lab" / "root" / "1.root.json"
    assert json.loads(published.read_text()) == json.loads((tmp_path / "root.json").read_text())


def test_the_device_classes_are_listed(tmp_path):
    from edgeslim.components.engine.devices import known_device_classes

    proc = run_bash(doc_block("docs/tensorrt.md", "engine-classes"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == sorted(known_device_classes())
    page = (REPO / "docs" / "tensorrt.md").read_text()
    assert all(f"`{key}`" in page for key in known_device_classes())


def test_compile_lays_the_pipeline_out_for_the_recipe(tmp_path):
    shutil.copy(REPO / "pipelines" / "demo_recipe.yaml", tmp_path / "recipe.yaml")
    proc = run_bash(doc_block("docs/kubeflow.md", "compile"), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = next(yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text()))
    assert {"pull-op", "quantize-op", "gate-op"} <= set(spec["root"]["dag"]["tasks"])
    assert "recipe_json" in spec["root"]["inputDefinitions"]["parameters"]
