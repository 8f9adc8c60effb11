"""The package list in pyproject.toml stays in step with the folders, and the compiled pipeline with the code."""

from __future__ import annotations

import copy
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


def pipeline_structure(text: str) -> list:
    """What a compiled pipeline *is*: components, inputs, outputs, DAG, executors, images, resources.

    Left out is what the kfp SDK writes of itself: ``sdkVersion`` and the shell launcher and
    imports it puts in front of each component's function. A patch release of kfp changes
    those and nothing the cluster runs differently (kfp 2.17.0 and 2.17.3 differ only there).
    """
    spec, *platform = yaml.safe_load_all(text)
    spec.pop("sdkVersion", None)
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor.get("container", {})
        program = container.pop("command", [])[-1:] or [""]
        # The component's own source, from its `def` on: the part edgeslim wrote.
        container["function_source"] = program[0][program[0].find("\ndef "):]
    return [spec, *platform]


def test_pipeline_structure_ignores_the_sdk_and_sees_a_changed_component():
    from edgeslim.pipelines.edge_compression import COMPILED

    spec, *platform = yaml.safe_load_all(COMPILED.read_text())

    def structure_after(change):
        changed = copy.deepcopy(spec)
        change(changed, changed["deploymentSpec"]["executors"]["exec-pull-op"]["container"])
        return pipeline_structure(yaml.safe_dump_all([changed, *platform]))

    same = structure_after(lambda s, c: None)
    assert same == pipeline_structure(COMPILED.read_text())
    # What the SDK writes of itself does not count ...
    assert structure_after(lambda s, c: s.update(sdkVersion="kfp-9.9.9")) == same
    assert structure_after(lambda s, c: c["command"].__setitem__(2, c["command"][2] + " --new-flag")) == same
    # ... what the pipeline runs does.
    assert structure_after(lambda s, c: c["command"].__setitem__(-1, c["command"][-1] + "    pass\n")) != same
    assert structure_after(lambda s, c: c.update(image="python:3.12")) != same
    assert structure_after(lambda s, c: c["args"].append("--x")) != same
    assert structure_after(lambda s, c: s["root"]["dag"]["tasks"].pop("gate-op")) != same


def test_checked_in_pipeline_matches_the_code(tmp_path):
    from edgeslim.pipelines.edge_compression import COMPILED, compile_pipeline

    # Two documents: the pipeline spec, then the Kubernetes platform spec (GPU node selectors).
    fresh = pipeline_structure(compile_pipeline(tmp_path / "p.yaml").read_text())
    stored = pipeline_structure(COMPILED.read_text())
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


def test_test_modules_have_unique_names():
    # The test folders are not packages: two test files of one name cannot both be collected.
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
