"""Import contracts: layers import downward only, no module imports itself back, and the device
agent stays light. Every import counts, module-level or inside a function (a lazy import is
still a dependency). docs/design.md, "Layers", shows them."""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"edgeslim": REPO / "src" / "edgeslim", "edgeslim.components": REPO / "components",
           "edgeslim.pipelines": REPO / "pipelines", "edgeslim.plugins": REPO / "plugins",
           "edgeslim.deploy": REPO / "deploy"}

# Lowest first; a module may import its own layer and the ones below it, never one above.
LAYERS = [
    ("common", ["edgeslim.components.common", "edgeslim.components.common.*"]),
    ("engine", ["edgeslim.components.engine", "edgeslim.components.engine.cuda", "edgeslim.components.engine.devices",
                "edgeslim.components.engine.config", "edgeslim.components.engine.tensorrt_calls",
                "edgeslim.components.engine.builder", "edgeslim.components.engine.runner",
                "edgeslim.components.engine.onnx_support"]),
    ("deploy", ["edgeslim.deploy", "edgeslim.deploy.*"]),
    ("recipe", ["edgeslim.components.recipe"]),
    ("stages", ["edgeslim.components", "edgeslim.components.export",
                "edgeslim.components.transform", "edgeslim.components.transform.*",
                "edgeslim.components.quantize", "edgeslim.components.quantize.*"]),
    # Each task package builds on the stages; everything above reaches it through the registry only.
    ("tasks", ["edgeslim.components.tasks", "edgeslim.components.tasks.*"]),
    ("stage-io", ["edgeslim.components.pull", "edgeslim.components.edge_model", "edgeslim.components.register",
                  "edgeslim.components.report",
                  "edgeslim.components.report_render", "edgeslim.components.engine.stage",
                  "edgeslim.components.engine.cli"]),
    ("reference", ["edgeslim.components.reference", "edgeslim.components.reference.*"]),
    ("kfp", ["edgeslim.components.kfp", "edgeslim.components.kfp.*"]),
    ("plugins", ["edgeslim.plugins", "edgeslim.plugins.*"]),
    ("pipelines", ["edgeslim.pipelines", "edgeslim.pipelines.*"]),
    ("cli", ["edgeslim", "edgeslim.*"]),
]
# deploy sits low because it may use only these (and its own modules): docs/design.md.
DEPLOY_MAY_IMPORT = ["edgeslim.components.common.*", "edgeslim.components.engine",
                     "edgeslim.components.engine.cuda", "edgeslim.components.engine.devices",
                     "edgeslim.components.engine.config", "edgeslim.components.engine.tensorrt_calls",
                     "edgeslim.components.engine.builder", "edgeslim.components.engine.runner",
                     "edgeslim.deploy", "edgeslim.deploy.*"]
AGENT = ["edgeslim.deploy.agent", "edgeslim.deploy.agent.*"]
AGENT_NEVER = ["torch", "mlflow", "kfp", "edgeslim.plugins", "edgeslim.pipelines", "torch_pruning", "sklearn"]
# A task package is reached through the task registry (``components/common/tasks.py``), never imported, except
# by the benchmarks and reference models of that one task, which measure and train its own parts.
TASK_PACKAGE = "edgeslim.components.tasks.*"
TASK_SHOWCASES = {"edgeslim.pipelines.bench": "classification", "edgeslim.pipelines.bench_archs": "classification",
                  "edgeslim.pipelines.bench_detect": "detection", "edgeslim.pipelines.bench_yolo": "detection",
                  "edgeslim.pipelines.demo_detect": "detection", "edgeslim.components.reference.detector": "detection",
                  "edgeslim.pipelines.bench_segment": "segmentation"}
# What a task package's own modules may hold at module level where the device agent loads them: the package
# (its Task class), its config and its numpy runtime half.
TASK_LIGHT_MODULES = ("", ".config", ".runtime")
HEAVY = ["torch", "mlflow", "kfp", "torch_pruning", "sklearn", "onnx", "onnxruntime"]
# Only the demo, the benches and the data provider that makes the demo's canvases use these.
REFERENCE_USERS = ["edgeslim.pipelines.*", "edgeslim.plugins.datasets", "edgeslim.components.reference.*", "edgeslim.cli_main"]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            if pkg == "edgeslim" and f.parent != folder:
                continue
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(edgeslim modules, other top-level packages) that ``name`` imports anywhere in its file."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "edgeslim":
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    ours.add(t)
            else:
                theirs.add(t.split(".")[0])
    return ours, theirs


def _match(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def layer_of(name: str) -> int:
    # The most specific pattern wins: an exact name before a wildcard.
    for exact in (True, False):
        for i, (_, patterns) in enumerate(LAYERS):
            if any((p == name) if exact else (("*" in p) and fnmatch.fnmatchcase(name, p)) for p in patterns):
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return mods, {n: imports_of(n, p, mods) for n, p in mods.items()}


def test_every_import_goes_down(graph):
    mods, g = graph
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, (ours, _) in g.items() for b in ours if layer_of(b) > layer_of(a)]
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_deploy_uses_only_common_and_the_engine(graph):
    _, g = graph
    bad = [f"{a} -> {b}" for a, (ours, _) in g.items() if _match(a, ["edgeslim.deploy", "edgeslim.deploy.*"])
           for b in ours if not _match(b, DEPLOY_MAY_IMPORT)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles(graph):
    _, g = graph
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v][0]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    # A package's __init__ that re-exports its modules is not a circle of logic.
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_agent_never_imports_torch_mlflow_kfp_plugins_or_pipelines(graph):
    _, g = graph
    seen, todo = set(), [m for m in g if _match(m, AGENT)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g[m][0])
    bad = sorted(f"{m} imports {t}" for m in seen for t in g[m][1] | g[m][0]
                 if t.split(".")[0] in AGENT_NEVER or _match(t, [p + "*" for p in AGENT_NEVER]))
    assert not bad, "the device agent reaches:\n" + "\n".join(bad)
    assert seen, "no agent modules found"


def _task_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[3] if len(parts) > 3 and parts[:3] == ["edgeslim", "components", "tasks"] else None


def test_task_packages_are_reached_only_through_the_registry(graph):
    mods, g = graph
    kinds = {_task_of(m) for m in mods} - {None}
    assert {"classification", "detection"} <= kinds, f"task packages found: {sorted(kinds)}"
    bad = [f"{a} -> {b}" for a, (ours, _) in g.items() for b in ours
           if _task_of(b) and _task_of(b) != _task_of(a) and TASK_SHOWCASES.get(a) != _task_of(b)]
    assert not bad, "imports of a task package from outside it (use the registry: common.tasks):\n" + "\n".join(
        sorted(bad))


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages a module imports when it is imported (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
    return found


def test_a_task_package_loads_without_torch(graph):
    """The agent and the edge pyfunc load a task through the registry for its runtime half: the package,
    its config and its runtime import nothing heavy at module level, and the runtime nothing heavy at all."""
    mods, g = graph
    bad = []
    for kind in sorted({_task_of(m) for m in mods} - {None}):
        for suffix in TASK_LIGHT_MODULES:
            name = f"edgeslim.components.tasks.{kind}{suffix}"
            if name not in mods:
                bad.append(f"{name} is missing: a task package has {', '.join(TASK_LIGHT_MODULES[1:])}")
                continue
            heavy = sorted(t for t in _module_level_imports(mods[name]) if t.split(".")[0] in HEAVY
                           or (t.startswith("edgeslim.") and _task_of(t) is None and layer_of(t) > layer_of(
                               "edgeslim.components.common")))
            bad += [f"{name} imports {t} at module level" for t in heavy]
        runtime = f"edgeslim.components.tasks.{kind}.runtime"
        if runtime in g:
            bad += [f"{runtime} imports {t}" for t in g[runtime][1] if t in HEAVY]
    assert not bad, "\n".join(bad)


def test_reference_models_are_only_for_the_demo_bench_and_tests(graph):
    _, g = graph
    bad = [f"{a} -> {b}" for a, (ours, _) in g.items() for b in ours
           if _match(b, ["edgeslim.components.reference*"]) and not _match(a, REFERENCE_USERS)]
    assert not bad, "\n".join(sorted(bad))


def test_the_contracts_catch_a_break(graph, tmp_path):
    mods, g = graph
    # An upward import inside a function still counts.
    fake = tmp_path / "evaluate.py"
    fake.write_text("def f():\n    from edgeslim.plugins.datasets import load_data\n")
    ours, _ = imports_of("edgeslim.components.tasks.classification.evaluate", fake, mods)
    assert "edgeslim.plugins.datasets" in ours
    assert layer_of("edgeslim.plugins.datasets") > layer_of("edgeslim.components.tasks.classification.evaluate")
    relative = tmp_path / "health.py"
    relative.write_text("def f():\n    from ...pipelines import demo\n")
    ours, _ = imports_of("edgeslim.deploy.agent.health", relative, mods)
    assert "edgeslim.pipelines.demo" in ours
