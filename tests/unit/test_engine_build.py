"""Everything around the TensorRT call: config, profiles, flags, metadata, cache keys, refusals.

No GPU and no TensorRT here. Nodes are described with ``LocalDevice``; where
a test needs a TensorRT *runtime* it is a stand-in module named
``mocked tensorrt`` that only carries a version (the refusal happens before
TensorRT would be asked to do anything).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from test_engine_fixtures import INPUT, make_digits_onnx

from edgeslim.components.engine import builder as eng
from edgeslim.components.common.config import Config
from edgeslim.components.engine.config import ShapeProfileConfig, TensorRTEngineConfig
from edgeslim.components.common.errors import (ConfigError, DeviceError, EdgeslimError, MissingDependencyError,
                                               SourceError)
from edgeslim.components.engine.devices import LocalDevice, get_device_class
from edgeslim.components.engine.runner import EngineRunner
from edgeslim.components.engine.tensorrt_calls import tensorrt_available

ORIN = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.1", l4t="36.4.0")
L4_NO_TRT = LocalDevice("NVIDIA L4", (8, 9), "12.8", None)
ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    fp32, qdq, splits = make_digits_onnx(tmp_path_factory.mktemp("onnx"))
    return fp32, qdq, splits


# --- config -----------------------------------------------------------------------------------


def test_engine_config_round_trips_through_json():
    cfg = TensorRTEngineConfig.from_dict({
        "device_classes": [ORIN_KEY, "ada-sm89-trt10"],
        "profiles": [{"input": "input", "min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}],
        "dla_core": None, "node_selectors": {"ada-sm89-trt10": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
        "verify": {"min_sqnr_db": 25},
    }, prefix="engines")
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert data["type"] == "TensorRTEngineConfig" and data["profiles"][0]["max"] == [32, 1, 8, 8]
    assert TensorRTEngineConfig.from_dict(data, prefix="engines") == cfg
    assert cfg.node_selector_for("ada-sm89-trt10") == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert cfg.node_selector_for(ORIN_KEY) == {"edgeslim.io/device-class": ORIN_KEY}


@pytest.mark.parametrize("bad, words", [
    ({"device_classes": ["orin"]}, "unknown device class 'orin'; known: ada-sm89-trt10"),
    ({"profiles": [{"input": "x", "min": [8], "opt": [4], "max": [2]}]}, "min 8, opt 4, max 2; it needs min <= opt <= max"),
    ({"profiles": [{"input": "x", "min": [1], "opt": [4], "max": [2]}]}, "min <= opt <= max"),
    ({"min_batch": 8, "opt_batch": 4}, "1 <= min_batch <= opt_batch <= max_batch"),
    ({"device_classes": ["ada-sm89-trt10"], "dla_core": 0}, "has no DLA; set dla_core: null"),
    ({"device_classes": [ORIN_KEY], "dla_core": 2}, "use 0..1 or null"),
    ({"device_classes": [ORIN_KEY], "hardware_compatibility": "ampere_plus"}, "not support it on JetPack"),
    ({"device_classes": ["xavier-sm72-jp5.1-trt8.5"], "version_compatible": True},
     "engines.version_compatible: a version-compatible engine needs TensorRT 8.6 or newer; "
     "device class xavier-sm72-jp5.1-trt8.5 has TensorRT 8.5"),
    ({"device_classes": ["hopper-sm90-trt11"], "precision": "fp16"},
     "engines.precision: fp16 (the FP16 builder flag) needs TensorRT before 11; "
     "device class hopper-sm90-trt11 has TensorRT 11.x"),
    ({"device_classes": ["xavier-sm72-jp5.1-trt8.5"], "strongly_typed": True},
     "engines.strongly_typed: a strongly typed network needs TensorRT 10.0 or newer; "
     "device class xavier-sm72-jp5.1-trt8.5 has TensorRT 8.5"),
    ({"device_classes": ["hopper-sm90-trt11"], "strongly_typed": False},
     "engines.strongly_typed: a weakly typed network (false) needs TensorRT before 11; "
     "device class hopper-sm90-trt11 has TensorRT 11.x"),
    ({"strongly_typed": True, "precision": "fp16"}, "a strongly typed network takes none"),
    ({"node_selectors": {ORIN_KEY: {"a": "b"}}}, "is not in engines.device_classes"),
    ({"device_classes": [ORIN_KEY], "node_selectors": {ORIN_KEY: "gpu"}}, "mapping of label to value"),
    ({"verify": {"min_top1_agreement": 1.5}}, "engines.verify.min_top1_agreement"),
    ({"workspace": 1}, "unknown key"),
    ({"device_classes": ["ada-sm89-trt10"], "min_tensorrt": {"ada-sm89-trt10": 10.9}},
     "engines.min_tensorrt.ada-sm89-trt10: got 10.9; use a string, e.g. '10.9'"),
    ({"device_classes": ["ada-sm89-trt10"], "min_tensorrt": {"ada-sm89-trt10": "12.0"}},
     "device class ada-sm89-trt10 admits TensorRT 10.0-10.16: use one of those releases"),
    ({"min_tensorrt": {ORIN_KEY: "10.3"}}, "engines.min_tensorrt: 'orin-sm87-jp6.1-trt10.3' is not in engines.device_classes"),
    ({"images": {ORIN_KEY: "registry.example/x:1"}}, "engines.images: 'orin-sm87-jp6.1-trt10.3' is not in"),
    ({"tolerations": [{"key": "nvidia.com/gpu", "effect": "Sometimes"}]},
     "engines.tolerations[0]: got {'key': 'nvidia.com/gpu', 'effect': 'Sometimes'}; use a mapping like "
     "{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule} (operator Equal or Exists"),
])
def test_bad_engine_config_is_one_clear_line(bad, words):
    with pytest.raises(ConfigError) as exc:
        TensorRTEngineConfig.from_dict(bad, prefix="engines")
    assert words in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith("engines")


def test_engine_config_is_a_plain_config_not_a_stage_config():
    from edgeslim.components.common.config import StageConfig

    assert issubclass(TensorRTEngineConfig, Config) and not issubclass(TensorRTEngineConfig, StageConfig)


# --- profiles -----------------------------------------------------------------------------------


def spec(name, shape):
    return eng.TensorSpec(name, shape, "float32")


def test_dynamic_batch_gets_the_default_profile():
    cfg = TensorRTEngineConfig(min_batch=1, opt_batch=16, max_batch=128)
    prof = eng.compute_profiles([spec("input", [-1, 1, 8, 8])], cfg)
    assert prof == {"input": {"min": [1, 1, 8, 8], "opt": [16, 1, 8, 8], "max": [128, 1, 8, 8]}}


def test_explicit_profile_overrides_and_other_dynamic_dims_need_one():
    inputs = [spec("image", [-1, 3, -1, -1]), spec("scale", [-1, 2])]
    with pytest.raises(ConfigError, match=r"'image' .* dynamic dimensions \[0, 2, 3\].*add"):
        eng.compute_profiles(inputs, TensorRTEngineConfig())
    cfg = TensorRTEngineConfig(profiles=[ShapeProfileConfig("image", [1, 3, 224, 224], [4, 3, 320, 320],
                                                            [8, 3, 640, 640])], max_batch=8)
    prof = eng.compute_profiles(inputs, cfg)
    assert prof["image"]["opt"] == [4, 3, 320, 320]
    assert prof["scale"] == {"min": [1, 2], "opt": [8, 2], "max": [8, 2]}


def test_profile_must_agree_with_the_onnx():
    inputs = [spec("image", [-1, 3, 32, 32])]
    wrong_static = TensorRTEngineConfig(profiles=[ShapeProfileConfig("image", [1, 1, 32, 32], [2, 1, 32, 32],
                                                                     [4, 1, 32, 32])])
    with pytest.raises(ConfigError, match="dimension 1 is fixed at 3"):
        eng.compute_profiles(inputs, wrong_static)
    wrong_rank = TensorRTEngineConfig(profiles=[ShapeProfileConfig("image", [1, 3], [2, 3], [4, 3])])
    with pytest.raises(ConfigError, match="2 dimensions, but input 'image' has 4"):
        eng.compute_profiles(inputs, wrong_rank)
    wrong_name = TensorRTEngineConfig(profiles=[ShapeProfileConfig("img", [1], [1], [1])])
    with pytest.raises(ConfigError, match="'img' is not an input of the ONNX; its inputs: image"):
        eng.compute_profiles(inputs, wrong_name)


def test_static_input_needs_no_profile():
    prof = eng.compute_profiles([spec("x", [1, 3, 8, 8])], TensorRTEngineConfig())
    assert prof["x"]["min"] == prof["x"]["opt"] == prof["x"]["max"] == [1, 3, 8, 8]


# --- API generation, flags --------------------------------------------------------------------


def test_tensorrt_10_builds_weakly_typed_with_int8_and_fp16_flags():
    assert eng.network_flags("10.3.0.30") == []
    assert eng.builder_flags("10.3.0.30", TensorRTEngineConfig()) == ["INT8", "FP16"]


def test_tensorrt_11_builds_strongly_typed_without_precision_flags():
    assert eng.network_flags("11.1.0") == ["STRONGLY_TYPED"]
    assert eng.builder_flags("11.1.0", TensorRTEngineConfig()) == []
    with pytest.raises(ConfigError, match=r"fp16 \(the FP16 builder flag\) needs TensorRT before 11"):
        eng.builder_flags("11.1.0", TensorRTEngineConfig(precision="fp16"))
    assert eng.network_flags("10.3.0", TensorRTEngineConfig(strongly_typed=True)) == ["STRONGLY_TYPED"]
    assert eng.builder_flags("10.3.0", TensorRTEngineConfig(strongly_typed=True)) == []


def test_tensorrt_8_needs_explicit_batch_and_dla_adds_gpu_fallback():
    assert eng.network_flags("8.5.2.2") == ["EXPLICIT_BATCH"]
    cfg = TensorRTEngineConfig(device_classes=["xavier-sm72-jp5.1-trt8.5"], dla_core=1)
    assert eng.builder_flags("8.5.2.2", cfg) == ["INT8", "FP16", "GPU_FALLBACK"]
    cfg = TensorRTEngineConfig(version_compatible=True, precision="fp32")
    assert eng.builder_flags("10.3.0", cfg) == ["VERSION_COMPATIBLE"]


# --- metadata and cache keys ------------------------------------------------------------------


def test_cache_key_is_tensorrt_version_and_compute_capability():
    assert eng.cache_key("10.3.0.30", (8, 7)) == "trt10.3.0.30-sm87"
    assert eng.cache_key("10.3.0.30", (8, 7)) != eng.cache_key("10.3.0.26", (8, 7))


def test_build_digest_changes_with_anything_that_shapes_the_engine():
    base = eng.build_settings(TensorRTEngineConfig(), {"input": {"min": [1], "opt": [8], "max": [64]}})
    d = eng.build_digest("aa", ORIN_KEY, base)
    assert d == eng.build_digest("aa", ORIN_KEY, dict(base))
    assert d != eng.build_digest("ab", ORIN_KEY, base)
    assert d != eng.build_digest("aa", "orin-sm87-jp6.2-trt10.3", base)
    assert d != eng.build_digest("aa", ORIN_KEY, {**base, "workspace_mib": 2048})


def test_metadata_records_platform_flags_io_and_hashes(onnx_pair):
    _, qdq, _ = onnx_pair
    plan = eng.plan_build(qdq, ORIN_KEY)
    meta = eng.make_metadata(device_class=plan.device_class, local=ORIN, tensorrt_version="10.3.0.30",
                             info=plan.onnx, config=plan.config, profiles=plan.profiles,
                             engine_sha256="ab" * 32, engine_bytes=1234, build_seconds=1.5)
    assert meta["device_class"] == ORIN_KEY and meta["tensorrt"] == "10.3.0.30"
    assert (meta["compute_capability"], meta["jetpack"], meta["l4t"], meta["cuda_driver"]) == \
        ("8.7", "6.1", "36.4.0", "12.6")
    assert meta["device_name"] == "Orin" and meta["builder_flags"] == ["INT8", "FP16"]
    assert meta["inputs"] == [{"name": INPUT, "shape": [-1, 1, 8, 8], "dtype": "float32"}]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert meta["onnx_sha256"] == eng.file_sha256(qdq) and meta["sha256"] == "ab" * 32
    assert meta["cache_key"] == "trt10.3.0.30-sm87"
    assert meta["artifact_key"] == f"{ORIN_KEY}/trt10.3.0.30-sm87/{'ab' * 8}"
    assert json.loads(json.dumps(meta)) == meta


def test_cache_hit_is_copied_and_a_corrupt_entry_is_ignored(tmp_path):
    entry = tmp_path / "cache" / "trt10.3.0.30-sm87" / "digest"
    entry.mkdir(parents=True)
    (entry / eng.ENGINE_FILE).write_bytes(b"serialized engine bytes")
    meta = {"format": eng.METADATA_FORMAT, "sha256": eng.file_sha256(entry / eng.ENGINE_FILE)}
    (entry / eng.META_FILE).write_text(json.dumps(meta))
    out = tmp_path / "out"
    out.mkdir()
    hit = eng._cache_lookup(entry, out)
    assert hit is not None and hit.cached and hit.engine_path.read_bytes() == b"serialized engine bytes"
    (entry / eng.ENGINE_FILE).write_bytes(b"truncated")
    assert eng._cache_lookup(entry, tmp_path / "out") is None


# --- refusals (each one line) -----------------------------------------------------------------


def one_line(exc: EdgeslimError) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


def test_int8_from_an_onnx_without_qdq_is_refused(onnx_pair):
    fp32, qdq, _ = onnx_pair
    with pytest.raises(SourceError) as exc:
        eng.plan_build(fp32, ORIN_KEY, TensorRTEngineConfig(precision="int8"))
    assert "no QuantizeLinear/DequantizeLinear nodes" in one_line(exc.value)
    assert eng.plan_build(fp32, ORIN_KEY, TensorRTEngineConfig(precision="fp16")).onnx.qdq_nodes == 0
    assert eng.plan_build(qdq, ORIN_KEY).onnx.qdq_nodes > 0


def test_unknown_device_class_is_refused_listing_known_ones(onnx_pair):
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(onnx_pair[1], "unused", "jetson-nano")
    assert "known: ada-sm89-trt10, hopper-sm90-trt10" in one_line(exc.value)


def test_missing_or_broken_onnx_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        eng.plan_build(tmp_path / "nope.onnx", ORIN_KEY)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not onnx at all")
    with pytest.raises(SourceError, match="cannot be read as ONNX"):
        eng.plan_build(bad, ORIN_KEY)


def test_build_without_a_cuda_device_is_refused(onnx_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(eng, "detect_local_device", lambda: None)
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(onnx_pair[1], tmp_path, ORIN_KEY)
    assert "no CUDA device on this node" in one_line(exc.value)


def test_build_node_of_another_architecture_is_refused(onnx_pair, tmp_path):
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(onnx_pair[1], tmp_path, ORIN_KEY, local=L4_NO_TRT)
    assert "needs compute capability 8.7" in one_line(exc.value)


def test_gpu_node_without_tensorrt_gets_the_install_hint_of_its_class(onnx_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail even if installed
    with pytest.raises(MissingDependencyError) as exc:
        eng.build_engine(onnx_pair[1], tmp_path, "ada-sm89-trt10", local=L4_NO_TRT)
    assert one_line(exc.value).endswith("install it with: pip install 'edgeslim[tensorrt10]'")
    with pytest.raises(MissingDependencyError) as exc:
        eng.build_engine(onnx_pair[1], tmp_path, ORIN_KEY, local=ORIN)
    assert "TensorRT 10.3 comes with JetPack 6.1 (sudo apt install nvidia-jetpack), not from pip" in str(exc.value)
    ok, why = tensorrt_available()
    assert not ok and "pip install 'edgeslim[tensorrt10]' or pip install 'edgeslim[tensorrt11]'" in why
    assert "edgeslim engine detect" in why and "\n" not in why
    ok, why = tensorrt_available("hopper-sm90-trt11")
    assert not ok and why.endswith("install it with: pip install 'edgeslim[tensorrt11]' (CUDA 13: an R580 or newer "
                                   "driver), or 'edgeslim[tensorrt11-cu12]' on a CUDA 12 driver")


def built_meta(onnx_pair, version="10.3.0.30", **over):
    plan = eng.plan_build(onnx_pair[1], ORIN_KEY)
    meta = eng.make_metadata(device_class=get_device_class(ORIN_KEY), local=ORIN, tensorrt_version=version,
                             info=plan.onnx, config=plan.config, profiles=plan.profiles,
                             engine_sha256="0" * 64, engine_bytes=3, build_seconds=0.1)
    meta.update(over)
    return meta


def test_engine_from_another_tensorrt_version_is_refused(onnx_pair):
    meta = built_meta(onnx_pair)
    eng.check_engine_compatible(meta, "10.3.0.30", ORIN)  # same version, same GPU: fine
    with pytest.raises(DeviceError) as exc:
        eng.check_engine_compatible(meta, "10.13.0.35")
    assert "built with TensorRT 10.3.0.30; this runtime is TensorRT 10.13.0.35" in one_line(exc.value)


def test_version_compatible_engine_runs_on_a_later_runtime_of_the_same_major(onnx_pair):
    meta = built_meta(onnx_pair, version_compatible=True)
    eng.check_engine_compatible(meta, "10.13.0.35")
    with pytest.raises(DeviceError):
        eng.check_engine_compatible(meta, "10.2.0")   # older runtime
    with pytest.raises(DeviceError):
        eng.check_engine_compatible(meta, "11.0.0")   # another major


def test_engine_for_another_gpu_architecture_is_refused(onnx_pair):
    meta = built_meta(onnx_pair)
    with pytest.raises(DeviceError, match="compute capability 8.7; this GPU .* is 7.2"):
        eng.check_engine_compatible(meta, "10.3.0.30", LocalDevice("Xavier", (7, 2), tensorrt="10.3.0.30"))


def test_runner_refuses_another_versions_engine_before_deserializing(onnx_pair, tmp_path, monkeypatch):
    # mocked tensorrt: only a version; deserializing would need the real library and a GPU.
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0.35"))
    (tmp_path / eng.ENGINE_FILE).write_bytes(b"engine built elsewhere")
    sha = eng.file_sha256(tmp_path / eng.ENGINE_FILE)
    (tmp_path / eng.META_FILE).write_text(json.dumps(built_meta(onnx_pair, sha256=sha)))
    with pytest.raises(DeviceError) as exc:
        EngineRunner(tmp_path, local=ORIN)
    assert "TensorRT 10.3.0.30; this runtime is TensorRT 10.13.0.35" in one_line(exc.value)


def test_runner_refuses_an_engine_without_metadata(tmp_path):
    (tmp_path / eng.ENGINE_FILE).write_bytes(b"x")
    with pytest.raises(DeviceError, match="missing or not JSON"):
        EngineRunner(tmp_path)


def test_builder_imports_no_torch_mlflow_kfp_or_tensorrt():
    """The device agent imports the builder and the runner on a Jetson: keep them light."""
    import subprocess

    code = ("import sys, edgeslim.components.engine.builder, edgeslim.components.engine.runner, "
            "edgeslim.components.engine.stage, edgeslim.components.engine.devices, edgeslim.components.engine.cli; "
            "print(sorted(m for m in ('torch', 'mlflow', 'kfp', 'tensorrt', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- TensorRT versions: features, extras, detect ----------------------------------------------------


@pytest.fixture
def extra_classes():
    """Two device classes only for these tests (the registry is global: undone after each test)."""
    from edgeslim.components.engine import devices

    ampere = devices.DeviceClass("ampere-sm80-trt10.3", "datacenter", "Ampere", (8, 0), "10.3", cuda="12")
    thor = devices.DeviceClass("orin-sm87-jp7.0-trt11.0", "jetson", "Orin (Ampere)", (8, 7), "11.0", "7.0",
                               "13", 2)
    for dc in (ampere, thor):
        devices.register_device_class(dc)
    yield ampere.key, thor.key
    for dc in (ampere, thor):
        devices.DEVICE_CLASSES.unregister(dc.key)


def test_every_version_gated_setting_is_refused_for_a_class_without_it_in_one_line(extra_classes):
    ampere, orin11 = extra_classes
    cases = [
        ({"device_classes": [ampere], "hardware_compatibility": "same_compute_capability"},
         f"engines.hardware_compatibility: same_compute_capability needs TensorRT 10.9 or newer; device class "
         f"{ampere} has TensorRT 10.3"),
        ({"device_classes": [orin11], "dla_core": 0},
         f"engines.dla_core: DLA needs TensorRT before 10.8, or 11.4.1 or newer; device class {orin11} has "
         "TensorRT 11.0"),
    ]
    for data, line in cases:
        with pytest.raises(ConfigError) as exc:
            TensorRTEngineConfig.from_dict(data, prefix="engines")
        assert one_line(exc.value) == line
    # A class whose range holds releases without it is refused too, naming the build nodes it would need;
    # engines.min_tensorrt narrows the class to those, and the build node's TensorRT is checked on the node.
    with pytest.raises(ConfigError) as exc:
        TensorRTEngineConfig(device_classes=["ada-sm89-trt10"], hardware_compatibility="same_compute_capability")
    assert one_line(exc.value) == (
        "engines.hardware_compatibility: same_compute_capability needs TensorRT 10.9 or newer; device class "
        "ada-sm89-trt10 admits TensorRT 10.0-10.16, and a build node with 10.0-10.8 cannot build it: build it only "
        "on nodes with 10.9-10.16 (engines.min_tensorrt: {ada-sm89-trt10: '10.9'}, and node selectors for those "
        "nodes), or drop the setting")
    cfg = TensorRTEngineConfig(device_classes=["ada-sm89-trt10"], hardware_compatibility="same_compute_capability",
                               min_tensorrt={"ada-sm89-trt10": "10.9"})
    assert cfg.tensorrt_version_problem("10.16.1.11", "ada-sm89-trt10") is None
    assert cfg.tensorrt_version_problem("10.8.0.43", "ada-sm89-trt10") == (
        "engines.hardware_compatibility: same_compute_capability needs TensorRT 10.9 or newer; this node has "
        "TensorRT 10.8.0.43")
    assert TensorRTEngineConfig(device_classes=["ada-sm89-trt10"], min_tensorrt={"ada-sm89-trt10": "10.9"}) \
        .tensorrt_version_problem("10.8.0.43", "ada-sm89-trt10") == (
        "engines.min_tensorrt: ada-sm89-trt10 builds on TensorRT 10.9 or newer; this node has TensorRT 10.8.0.43: "
        "run the build on a node with a newer TensorRT")


def test_feature_versions_read_as_ranges():
    from edgeslim.components.engine.devices import TENSORRT_FEATURES as F

    assert F["hardware_compatibility.same_compute_capability"].supported_by("10.9.0.34")
    assert not F["hardware_compatibility.same_compute_capability"].supported_by("10.8.0.43")
    assert F["fp16_flag"].supported_by("10.14.1.48.post1") and not F["fp16_flag"].supported_by("11.0.0.114")
    assert F["dla"].supported_by("10.7.0") and not F["dla"].supported_by("10.8.0.43")
    assert not F["dla"].supported_by("11.4.0.106") and F["dla"].supported_by("11.4.1")
    xavier, ada = get_device_class("xavier-sm72-jp5.1-trt8.5"), get_device_class("ada-sm89-trt10")
    assert F["version_compatible"].lacking_in(xavier) == ("8.5",) and F["version_compatible"].lacking_in(ada) == ()
    same_cc = F["hardware_compatibility.same_compute_capability"]
    assert same_cc.lacking_in(ada) == tuple(f"10.{m}" for m in range(9))  # 10.0-10.8 of the class's 10.x
    assert same_cc.lacking_in(ada, "10.9") == ()
    assert same_cc.lacking_in(get_device_class(ORIN_KEY)) == ("10.3",)


def test_build_refuses_a_setting_the_nodes_tensorrt_lacks_before_calling_it(onnx_pair, tmp_path, monkeypatch):
    called = []
    trt = types.SimpleNamespace(__version__="10.3.0", Builder=lambda logger: called.append(logger))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cfg = TensorRTEngineConfig(version_compatible=True, hardware_compatibility="same_compute_capability",
                               device_classes=["ada-sm89-trt10"], min_tensorrt={"ada-sm89-trt10": "10.9"})
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(onnx_pair[1], tmp_path, "ada-sm89-trt10", cfg, local=L4_NO_TRT)
    assert "same_compute_capability needs TensorRT 10.9 or newer; this node has TensorRT 10.3.0" in one_line(exc.value)
    assert called == []


def test_each_class_has_one_way_to_its_tensorrt_and_the_docs_table_says_it():
    from edgeslim.components.engine.devices import known_device_classes, tensorrt_extra, tensorrt_install_hint

    page = (REPO / "docs" / "tensorrt.md").read_text()
    section = page.split("## TensorRT per device class", 1)[1].split("\n## ", 1)[0]
    rows = {ln.split("|")[1].strip().strip("`"): ln for ln in section.splitlines() if ln.startswith("| `")}
    for key in known_device_classes():
        dc = get_device_class(key)
        extra = tensorrt_extra(dc)
        assert key in rows, f"docs/tensorrt.md's TensorRT table has no row for {key}"
        if dc.is_jetson:
            assert extra is None and f"JetPack {dc.jetpack}" in rows[key] and "edgeslim[" not in rows[key]
            assert "pip install" not in tensorrt_install_hint(dc)
        else:
            assert extra == f"tensorrt{dc.tensorrt_major}" and f"pip install 'edgeslim[{extra}]'" in rows[key]
            assert tensorrt_install_hint(dc).startswith(f"install it with: pip install 'edgeslim[{extra}]'")
            if dc.tensorrt_major == 11:  # TensorRT 11 on a CUDA 12 driver: tensorrt-cu12 ships 11.x too
                assert "'edgeslim[tensorrt11-cu12]'" in rows[key] and "R580" in rows[key]
                assert "'edgeslim[tensorrt11-cu12]' on a CUDA 12 driver" in tensorrt_install_hint(dc)


def test_the_tensorrt_extras_resolve_within_their_generation():
    """Finding 2: `tensorrt>=10.0` resolved to 11.x (its meta package pulls CUDA 13 builds)."""
    import tomllib

    from packaging.requirements import Requirement

    from edgeslim.components.engine.devices import TENSORRT11_CUDA12, TENSORRT_EXTRAS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "tensorrt" not in extras
    for major, (extra, requirement) in TENSORRT_EXTRAS.items():
        assert extras[extra] == [requirement, "polygraphy>=0.49"]
        req = Requirement(requirement)
        assert req.name == {10: "tensorrt-cu12", 11: "tensorrt-cu13"}[major]
        newest = {10: ["10.3.0", "10.16.1.11"], 11: ["11.0.0.114", "11.4.0.106"]}[major]
        assert all(req.specifier.contains(v) for v in newest)
        assert not any(req.specifier.contains(v) for v in ("10.2.0", "11.0.0", "12.0.0") if int(v[:2]) != major)
    extra, requirement = TENSORRT11_CUDA12  # TensorRT 11 from tensorrt-cu12, for a CUDA 12 driver
    assert extras[extra] == [requirement, "polygraphy>=0.49"]
    req = Requirement(requirement)
    assert req.name == "tensorrt-cu12" and req.specifier.contains("11.4.0.106") and not req.specifier.contains("10.16.1.11")


@pytest.mark.parametrize("node, lines", [
    (LocalDevice("NVIDIA L4", (8, 9), "12.8", None),
     ["NVIDIA L4 (sm89), TensorRT not installed: device class ada-sm89-trt10",
      "  TensorRT for ada-sm89-trt10: install it with: pip install 'edgeslim[tensorrt10]'"]),
    (LocalDevice("NVIDIA H100", (9, 0), "13.0", None),
     ["NVIDIA H100 (sm90), TensorRT not installed: device class hopper-sm90-trt10 or hopper-sm90-trt11, by the "
      "TensorRT you install",
      "  TensorRT for hopper-sm90-trt10: install it with: pip install 'edgeslim[tensorrt10]'",
      "  TensorRT for hopper-sm90-trt11: install it with: pip install 'edgeslim[tensorrt11]' (CUDA 13: an R580 or "
      "newer driver), or 'edgeslim[tensorrt11-cu12]' on a CUDA 12 driver"]),
    (ORIN,
     ["Orin (sm87), TensorRT 10.3.0.30, JetPack 6.1: device class orin-sm87-jp6.1-trt10.3",
      "  TensorRT for orin-sm87-jp6.1-trt10.3: installed (10.3.0.30); TensorRT 10.3 comes with JetPack 6.1 "
      "(sudo apt install nvidia-jetpack), not from pip"]),
])
def test_engine_detect_names_the_extra_of_the_class(node, lines, monkeypatch, capsys):
    from edgeslim.components.engine import cli as engine_cli, devices

    monkeypatch.setattr(devices, "detect_local_device", lambda: node)
    assert engine_cli._cmd_detect(types.SimpleNamespace()) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_engine_detect_on_a_node_with_the_wrong_tensorrt_says_which_extra(monkeypatch):
    from edgeslim.components.engine import cli as engine_cli, devices

    node = LocalDevice("NVIDIA L4", (8, 9), "12.8", "11.4.0.106")  # what `pip install tensorrt` gives
    monkeypatch.setattr(devices, "detect_local_device", lambda: node)
    with pytest.raises(DeviceError) as exc:
        engine_cli._cmd_detect(types.SimpleNamespace())
    assert one_line(exc.value).endswith("has the GPU of ada-sm89-trt10 but not its TensorRT: ada-sm89-trt10 needs "
                                        "TensorRT 10.x (install it with: pip install 'edgeslim[tensorrt10]')")
