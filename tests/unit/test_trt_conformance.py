"""TensorRT truth on a CPU machine: every TensorRT name edgeslim uses, against the real bindings.

The builder, the runner, the edge pyfunc and the device agent's health check use
``tensorrt``; no GPU has been lent, so they are checked against the real Python
bindings of each TensorRT generation edgeslim claims, loaded over stub libraries
(tests/unit/trt/harness.py): 10.3 (JetPack 6), 10.16 (the newest 10.x), 11.4
(the newest 11.x) and 8.6.1 (the newest 8.x on PyPI). TensorRT 8.5 (Xavier,
JetPack 5.1) was never on PyPI: it is checked against its documented API, the
8.6.1 bindings minus what the TensorRT OSS pybind sources add between tags 8.5.2
and v8.6.1 (tests/unit/trt/snapshots/tensorrt-8.5.2.2.json says so too).

Two halves:

- On the checked-in snapshots (no network): every enum member, class, method
  and property edgeslim uses exists in each version, for every configuration
  the version gate lets through; the feature table's version ranges agree with
  the bindings; and a wrong attribute is caught. What the engine's builder.py,
  runner.py and tensorrt_calls.py and the agent's health.py touch is found by a
  scan that follows types (tests/unit/trt/typescan.py: ``c2 = self.context`` is
  still an execution context), must be declared here, and each call's argument
  count must fit the recorded pybind signatures of every version.
- Against the real bindings (a session fixture downloads the ~1 MB wheels once
  into ~/.cache/edgeslim/trt-bindings and builds the stubs with gcc): the
  snapshots still equal the real modules (so the mocked ``tensorrt`` the unit
  tests generate from them cannot grow a fake attribute), and edgeslim's own
  code runs against each real module as far as it goes without a device:
  ``trt.Builder(...)`` and ``trt.Runtime(...)`` return null objects, which must
  become one-line ``EdgeslimError``s, and the pyfunc and the health check
  (through Polygraphy) must fall back to ONNX Runtime and say so. Without PyPI
  these skip with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from test_engine_fixtures import make_digits_onnx

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.engine import builder as eng
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.engine.devices import TENSORRT_EXTRAS, TENSORRT_FEATURES

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("trt_harness", Path(__file__).parent / "trt" / "harness.py")
harness = sys.modules.setdefault("trt_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)
_spec = importlib.util.spec_from_file_location("trt_typescan", Path(__file__).parent / "trt" / "typescan.py")
typescan = sys.modules.setdefault("trt_typescan", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(typescan)

VERSIONS = harness.snapshot_versions()   # the real bindings' versions, then the documented 8.5
REAL = list(harness.BINDINGS)
NULLPTR = "TypeError: pybind11::init(): factory function returned nullptr"

# What edgeslim's TensorRT code touches on each class (the scan of the code, which follows types, must find
# nothing beyond these; how many arguments each call passes comes from that scan).
USED_MEMBERS = {
    "Builder": {"__init__", "create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"},
    "INetworkDefinition": {"num_inputs", "num_outputs", "get_input", "get_output"},
    "ITensor": {"name", "shape", "dtype"},
    "OnnxParser": {"__init__", "parse_from_file", "num_errors", "get_error"},
    "ParserError": {"__str__"},
    "IBuilderConfig": {"set_memory_pool_limit", "set_flag", "add_optimization_profile", "create_timing_cache",
                       "set_timing_cache", "get_timing_cache"},
    "IOptimizationProfile": {"set_shape"},
    "ITimingCache": {"serialize"},
    "Runtime": {"__init__", "deserialize_cuda_engine"},
    "ICudaEngine": {"create_execution_context", "num_io_tensors", "get_tensor_name", "get_tensor_mode",
                    "get_tensor_shape", "get_tensor_dtype"},
    "IExecutionContext": {"set_input_shape", "set_tensor_address", "get_tensor_shape", "execute_async_v3"},
    "ILogger": {"__init__", "log", "Severity"},
}
# Members used only with a setting, so only where the version gate lets that setting through.
USED_WITH = {
    ("IBuilderConfig", "hardware_compatibility_level"): ("hardware_compatibility.ampere_plus",
                                                         "hardware_compatibility.same_compute_capability"),
    ("Runtime", "engine_host_code_allowed"): ("version_compatible",),
    ("Builder", "num_DLA_cores"): ("dla",),
    ("IBuilderConfig", "default_device_type"): ("dla",),
    ("IBuilderConfig", "DLA_core"): ("dla",),
}
USED_TOPLEVEL = {"__version__", "Builder", "OnnxParser", "Runtime", "ILogger", "nptype", "DataType", "TensorIOMode"}
ENGINE = REPO / "components" / "engine"
# Where edgeslim calls TensorRT: file -> the functions and classes that do.
TENSORRT_CODE = {ENGINE / "builder.py": ("_build_with_tensorrt", "_attach_timing_cache", "_io_of_network"),
                 ENGINE / "runner.py": ("EngineRunner",),
                 ENGINE / "tensorrt_calls.py": ("collecting_logger", "tensorrt_available", "enum_member"),
                 REPO / "deploy" / "agent" / "health.py": ("_tensorrt_runner",)}


def snapshot(version: str) -> dict:
    return harness.load_snapshot(version)


def _configs():
    for precision, strong, vc, hw, dla, fallback in itertools.product(
            ("int8", "fp16", "fp32"), (None, True, False), (False, True),
            ("none", "ampere_plus", "same_compute_capability"), (None, 0), (True, False)):
        try:
            yield TensorRTEngineConfig(precision=precision, strongly_typed=strong, version_compatible=vc,
                                       hardware_compatibility=hw, dla_core=dla, gpu_fallback=fallback)
        except ConfigError:
            continue


def uses(version: str) -> dict[str, set[str]]:
    """Every ``Enum.MEMBER``/``Class.member``/top-level name edgeslim uses on ``version``, by owner."""
    out: dict[str, set[str]] = defaultdict(set)
    out["tensorrt"] = set(USED_TOPLEVEL)
    for cls, members in USED_MEMBERS.items():
        out[cls] |= set(members)
    for (cls, member), features in USED_WITH.items():
        if any(TENSORRT_FEATURES[f].supported_by(version) for f in features):
            out[cls].add(member)
    for cfg in _configs():
        if cfg.tensorrt_version_problem(version):
            continue  # the gate refuses it before TensorRT is asked
        try:
            settings = eng.tensorrt_settings(version, cfg)
        except ConfigError:
            continue
        for enum, names in settings.items():
            if names:
                out["tensorrt"].add(enum)
                out[enum] |= set(names)
    out["TensorIOMode"].add("INPUT")
    out["ILogger.Severity"] |= {"ERROR", "INTERNAL_ERROR", "WARNING"}  # log_problems reads these names
    return out


def missing(snap: dict, used: dict[str, set[str]]) -> list[str]:
    """The used names ``snap`` lacks, as ``Owner.name``."""
    gone = []
    for owner, names in sorted(used.items()):
        have = (set(snap["toplevel"]) if owner == "tensorrt" else set(snap["enums"].get(owner, ()))
                | set(snap["classes"].get(owner, ())))
        gone += [f"{owner}.{n}" for n in sorted(names - have)]
    return gone


def _params(signature: str) -> tuple[int, int]:
    """(required, total) parameters after ``self`` of a pybind signature line."""
    inner = signature[signature.index("(") + 1:]
    depth, part, parts = 0, "", []
    for ch in inner:
        if ch in "([{" or (ch == ")" and depth) or ch in "]}":
            depth += 1 if ch in "([{" else -1
        elif ch == ")" and not depth:
            break
        if ch == "," and not depth:
            parts.append(part)
            part = ""
        else:
            part += ch
    parts = [p.strip() for p in parts + [part] if p.strip()][1:]  # drop self
    return sum(1 for p in parts if "=" not in p), len(parts)


# --- on the snapshots: no network -------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_edgeslim_uses_exists(version):
    """For 8.5 this is the documented API (not on PyPI); for the others, the real bindings' snapshot."""
    assert missing(snapshot(version), uses(version)) == []


def scan_code(plant: dict | None = None):
    """The type-following scan of TENSORRT_CODE; ``plant`` maps a file to ``(after, lines)`` put into its text."""
    scan = typescan.TypeScan([snapshot(v) for v in VERSIONS])
    for path, names in TENSORRT_CODE.items():
        text = path.read_text()
        if plant and path in plant:
            after, lines = plant[path]
            head, tail = text.split(after, 1)
            indent = after.splitlines()[-1][: len(after.splitlines()[-1]) - len(after.splitlines()[-1].lstrip())]
            text = head + after + "".join(f"\n{indent}{ln}" for ln in lines) + tail
        found = scan.scan(text, names, path.name)
        assert sorted(found) == sorted(names), f"{path.name} no longer has all of {names}"
    return scan


def misfits(version: str, calls) -> list[str]:
    """Calls whose argument count fits no overload of the member's recorded signature on ``version``."""
    snap, used = snapshot(version), uses(version)
    out = []
    for call in sorted(calls, key=lambda c: (c.owner, c.member, c.where)):
        sigs = [sig for sig in snap["signatures"].get(f"{call.owner}.{call.member}", []) if "*args" not in sig]
        if call.member not in used.get(call.owner, ()) or not sigs:
            continue  # a member the version gate keeps off this version, or one pybind documents no signature of
        if not any(lo <= call.nargs <= hi for lo, hi in map(_params, sigs)):
            out.append(f"{call.where}: {call.owner}.{call.member} gets {call.nargs} argument(s); it takes {sigs}")
    return out


@pytest.fixture(scope="module")
def scanned():
    return scan_code()


@pytest.mark.parametrize("version", VERSIONS)
def test_the_calls_fit_the_pybind_signatures(version, scanned):
    assert misfits(version, scanned.calls) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_the_feature_table_agrees_with_the_bindings(version):
    snap = snapshot(version)
    for key, feature in TENSORRT_FEATURES.items():
        enum, member = feature.api.split(".")
        has = member in snap["enums"].get(enum, {})
        if feature.supported_by(version):
            assert has, f"{key}: TensorRT {version} should have {feature.api} ({feature.requirement()})"
        elif feature.api_marks_support:
            assert not has, f"{key}: TensorRT {version} has {feature.api}, but the table says {feature.requirement()}"


def test_a_wrong_attribute_fails_the_check():
    used = uses("10.3.0")
    assert missing(snapshot("10.3.0"), used) == []
    fake = dict(used, Builder=used["Builder"] | {"build_engine"},                # TensorRT 8's, gone in 10
                HardwareCompatibilityLevel={"SAME_COMPUTE_CAPABILITY"},          # 10.9 and newer
                BuilderFlag=used["BuilderFlag"] | {"STRICT_TYPES"})              # gone in 10
    assert missing(snapshot("10.3.0"), fake) == ["Builder.build_engine", "BuilderFlag.STRICT_TYPES",
                                                 "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"]
    assert missing(snapshot("11.4.0.106"), {"BuilderFlag": {"INT8", "FP16"}}) == ["BuilderFlag.FP16",
                                                                                  "BuilderFlag.INT8"]


def undeclared(scan) -> list[str]:
    declared = {(owner, n) for version in VERSIONS for owner, names in uses(version).items() for n in names}
    return sorted(f"{owner}.{name}" for owner, name in scan.uses - declared)


def test_the_declared_uses_cover_what_the_code_touches(scanned):
    """A TensorRT name added to the engine's TensorRT code or health.py without being declared here fails this."""
    assert undeclared(scanned) == []
    assert {("Builder", "create_network"), ("tensorrt", "nptype"), ("TensorIOMode", "INPUT"),
            ("Runtime", "engine_host_code_allowed"), ("tensorrt", "__version__"), ("ParserError", "__str__"),
            ("ITimingCache", "serialize"), ("ILogger", "log")} <= scanned.uses


def test_a_member_reached_under_another_name_or_with_a_wrong_argument_count_is_caught():
    """The scan follows types: an execution-context setting of the newest releases reached through an alias is
    found (JetPack's 10.3 lacks it), and so is a call whose argument count no recorded signature takes."""
    runner = ENGINE / "runner.py"
    after = "            self.context = self.engine.create_execution_context()"
    planted = scan_code({runner: (after, ["c2 = self.context", "c2.unfused_tensors_debug_state = False",
                                          "c2.set_input_shape(self.engine.get_tensor_name(0))"])})
    assert undeclared(planted) == ["IExecutionContext.unfused_tensors_debug_state"]
    use = {"IExecutionContext": {"unfused_tensors_debug_state"}}
    assert {"8.5.2.2", "8.6.1", "10.3.0"} <= {v for v in VERSIONS if missing(snapshot(v), use)}  # JetPack 5 and 6 lack it
    for version in ("10.3.0", "11.4.0.106"):
        [wrong] = misfits(version, planted.calls)
        assert wrong.startswith("runner.py:") and "IExecutionContext.set_input_shape gets 1 argument(s)" in wrong


# --- against the real bindings ------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_bindings():
    try:
        return {v: harness.prepare(v) for v in REAL}
    except harness.Unavailable as exc:
        msg = f"the TensorRT bindings wheels cannot be set up here: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def real(real_bindings, tmp_path_factory):
    """What each real module is, and what edgeslim's code does against it (one subprocess per version)."""
    _, qdq, _ = make_digits_onnx(tmp_path_factory.mktemp("onnx"), opset=17)  # every generation parses 17 (8.x: at most)
    out = {}
    for version, bindings in real_bindings.items():
        out[version] = bindings.run("exercise", str(tmp_path_factory.mktemp(f"trt{version}")), str(qdq))
    return out


@pytest.mark.parametrize("version", REAL)
def test_the_snapshot_is_what_the_real_bindings_have(real, version):
    """The mocked tensorrt is generated from these files: a name the real module lacks cannot be in it."""
    recorded = {k: v for k, v in snapshot(version).items() if k != "source"}
    assert recorded == real[version]["snapshot"], (
        f"tests/unit/trt/snapshots/tensorrt-{version}.json differs from the real bindings; regenerate it with "
        "python tests/unit/trt/generate_snapshots.py")


def test_the_documented_8_5_is_the_real_8_6_1_minus_what_8_6_added(real):
    documented = snapshot(harness.DOCUMENTED)
    derived = harness.derive_documented(real[harness.DOCUMENTED_FROM]["snapshot"], documented["delta_from_8.6.1"])
    assert {k: v for k, v in documented.items() if k not in ("source", "delta_from_8.6.1")} == derived
    assert "HardwareCompatibilityLevel" in documented["delta_from_8.6.1"]["new"]
    assert "VERSION_COMPATIBLE" in documented["delta_from_8.6.1"]["members"]["BuilderFlag"]


@pytest.mark.parametrize("version", REAL)
def test_the_builder_gets_as_far_as_trt_builder_and_says_why_in_one_line(real, version):
    ex = real[version]["exercise"]
    assert ex["tensorrt_available"] == [True, f"tensorrt {version}"]
    build = ex["build"]
    assert build["edgeslim"] and build["raised"] == "DeviceError" and "\n" not in build["message"]
    assert build["message"].startswith(f"TensorRT {version} could not create its builder ({NULLPTR}")
    assert ex["logger"] == ["[ERROR] conformance line"]  # edgeslim's ILogger subclass, called like TensorRT does


@pytest.mark.parametrize("version", REAL)
def test_same_compute_capability_is_refused_where_the_bindings_lack_it(real, version):
    same_cc = real[version]["exercise"]["same_compute_capability"]
    assert same_cc["edgeslim"] and "\n" not in same_cc["message"]
    if TENSORRT_FEATURES["hardware_compatibility.same_compute_capability"].supported_by(version):
        assert same_cc["message"].startswith(f"TensorRT {version} could not create its builder")
    else:
        assert "same_compute_capability needs TensorRT 10.9 or newer" in same_cc["message"]


@pytest.mark.parametrize("version", REAL)
def test_the_runner_gets_as_far_as_trt_runtime_and_says_why_in_one_line(real, version):
    runner = real[version]["exercise"]["runner"]
    assert runner["edgeslim"] and runner["raised"] == "DeviceError" and "\n" not in runner["message"]
    assert runner["message"].startswith(f"TensorRT {version} could not create its runtime ({NULLPTR}")


@pytest.mark.parametrize("version", REAL)
def test_the_edge_pyfunc_falls_back_to_onnxruntime_and_says_so(real, version):
    ex = real[version]["exercise"]
    model = ex["edge_model"]
    assert model["raised"] is None, model
    backend = f"onnxruntime:CPUExecutionProvider (fallback from tensorrt:{ex['device_class']})"
    assert model["value"]["backend"] == model["value"]["predict_backend"] == backend
    assert NULLPTR in model["value"]["reason"]


@pytest.mark.parametrize("version", REAL)
def test_the_agents_health_check_falls_back_to_onnxruntime_and_says_so(real, version):
    health = real[version]["exercise"]["health"]
    assert health["ok"], health
    assert health["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt)"
    assert health["fallback"].startswith("TensorRT engine unusable:")


@pytest.mark.parametrize("major", sorted(TENSORRT_EXTRAS))
def test_each_tensorrt_extra_resolves_to_its_generation_on_pypi(real_bindings, major, tmp_path):
    """`pip install --dry-run '.[tensorrt10]'` stops at tensorrt_cu12_libs, a placeholder that downloads from
    NVIDIA's index (unreachable here): what the extra pins is resolved on its own, without dependencies."""
    extra, requirement = TENSORRT_EXTRAS[major]
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--disable-pip-version-check", "-q", "--report", str(report), requirement],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [item] = json.loads(report.read_text())["install"]
    meta = item["metadata"]
    assert meta["version"].split(".")[0] == str(major), f"[{extra}] resolves to {meta['name']} {meta['version']}"
    cuda = {10: "cu12", 11: "cu13"}[major]
    assert all(cuda in dep for dep in meta.get("requires_dist", []) if dep.startswith("tensorrt"))


def test_tensorrt_11_for_cuda_12_resolves_to_11_on_pypi(real_bindings, tmp_path):
    """tensorrt-cu12 ships 11.x too: the `tensorrt11-cu12` extra's requirement resolves to an 11.x built for CUDA 12."""
    from edgeslim.components.engine.devices import TENSORRT11_CUDA12

    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--disable-pip-version-check", "-q", "--report", str(report), TENSORRT11_CUDA12[1]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [item] = json.loads(report.read_text())["install"]
    assert item["metadata"]["version"].split(".")[0] == "11"
    assert all("cu12" in dep for dep in item["metadata"].get("requires_dist", []) if dep.startswith("tensorrt"))
