"""The package list in pyproject.toml stays in step with the folders, and the compiled pipeline with the code."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_and_every_listed_package_exists():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = cfg["package-dir"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in dirs.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            if not any(part.startswith((".", "__")) for part in rel.parts):
                found.add(name)
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"


def test_checked_in_pipeline_matches_the_code(tmp_path):
    from edgeslim.pipelines.edge_compression import COMPILED, compile_pipeline

    # Two documents: the pipeline spec, then the Kubernetes platform spec (GPU node selectors).
    fresh = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    stored = list(yaml.safe_load_all(COMPILED.read_text()))
    assert fresh == stored, "pipelines/edge_compression.yaml is stale: run `edgeslim compile -o pipelines/edge_compression.yaml`"


def test_compiled_pipeline_has_the_gate_branch_and_all_stages():
    from edgeslim.pipelines.edge_compression import COMPILED

    text = COMPILED.read_text()
    for name in ("pull-op", "export-op", "transform-op", "quantize-op", "evaluate-op", "gate-op",
                 "plan-engines-op", "engine-build-op", "register-op", "reject-op", "report-op",
                 "condition-branches"):
        assert name in text
    spec, platform = yaml.safe_load_all(text)
    # The engine task asks for a GPU and a node of its device class.
    engine = spec["deploymentSpec"]["executors"]["exec-engine-build-op"]["container"]
    assert engine["resources"]["accelerator"]["resourceCount"] == "1"
    selector = json.dumps(platform)
    assert "nodeSelector" in selector
