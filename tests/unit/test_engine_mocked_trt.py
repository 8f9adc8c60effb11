"""The engine builder's TensorRT calls, against a mocked TensorRT module generated from the real one.

There is no GPU here, so the mocked ``tensorrt`` of trt_mocks.py stands in for the module: its
enums and classes are the real ones of each TensorRT version (checked first, below), it records
the calls the builder makes (network flags, builder flags, profiles, timing cache, DLA) and fails
the way the real one does. What this checks is edgeslim's side. Real builds: tests/gpu. The
runner and the fallbacks to ONNX Runtime: test_engine_mocked_trt_runtime.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_engine_fixtures import INPUT, FakeAttribute, MockedTensorRT, make_digits_onnx, trt_snapshot
from trt_mocks import (H100, L4, NULLPTR, ORIN, TRT8_5, TRT10, TRT10_JETPACK6, TRT11, XAVIER, install,
                       mocked_tensorrt, one_line)

from edgeslim.components.common.errors import DeviceError, SourceError
from edgeslim.components.engine import builder as eng
from edgeslim.components.engine import tensorrt_calls
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.engine.devices import TENSORRT_FEATURES


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    return make_digits_onnx(tmp_path_factory.mktemp("onnx"))


# --- the mock is the real API ---------------------------------------------------------------------


@pytest.mark.parametrize("version, flags", [
    (TRT8_5, {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}),
    ("8.6.1", {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}),
    (TRT10_JETPACK6, {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}),
    (TRT10, {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2,
             "PREFER_AOT_PYTHON_PLUGINS": 3}),
    (TRT11, {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}),
])
def test_mocked_enums_are_the_real_ones(version, flags):
    trt = mocked_tensorrt(version, [])
    assert {k: int(v) for k, v in trt.NetworkDefinitionCreationFlag.__members__.items()} == flags
    weak = trt.__version__.split(".")[0] != "11"
    assert hasattr(trt.BuilderFlag, "INT8") == hasattr(trt.BuilderFlag, "FP16") == weak  # 11 removed them
    same_cc = TENSORRT_FEATURES["hardware_compatibility.same_compute_capability"].supported_by(trt.__version__)
    assert hasattr(trt, "HardwareCompatibilityLevel") == (version != TRT8_5)  # came with 8.6
    assert hasattr(getattr(trt, "HardwareCompatibilityLevel", None), "SAME_COMPUTE_CAPABILITY") == same_cc


@pytest.mark.parametrize("version", [TRT8_5, TRT10_JETPACK6, TRT10, TRT11])
def test_mocked_nptype_refuses_what_numpy_cannot_hold(version):
    trt = mocked_tensorrt(version, [])
    assert trt.nptype(trt.DataType.FLOAT) is np.float32 and trt.nptype(trt.DataType.INT8) is np.int8
    for name in ("BF16", "FP8", "INT4", "FP4"):
        if hasattr(trt.DataType, name):
            with pytest.raises(TypeError, match="Could not resolve TensorRT datatype"):
                trt.nptype(getattr(trt.DataType, name))


def test_a_fake_attribute_cannot_exist_in_the_mock():
    mocked = MockedTensorRT(TRT10)
    with pytest.raises(FakeAttribute, match=r"\['build_engine'\]"):  # TensorRT 8.x's, gone in 10
        class Builder(mocked.base("Builder")):
            def build_engine(self, network, config):
                pass
    with pytest.raises(FakeAttribute, match="has no class 'IBuilder'"):
        mocked.base("IBuilder")
    with pytest.raises(FakeAttribute, match="'max_workspace_size'"):
        mocked.module.max_workspace_size = 1

    class IBuilderConfig(mocked.base("IBuilderConfig")):
        pass

    cfg = IBuilderConfig()
    cfg.DLA_core = 0
    with pytest.raises(AttributeError, match="no attribute 'max_workspace_size'"):
        cfg.max_workspace_size = 1 << 30
    with pytest.raises(AttributeError):
        MockedTensorRT(TRT11).module.BuilderFlag.FP16  # noqa: B018  (11 removed it)
    assert "FP16" in trt_snapshot(TRT10)["enums"]["BuilderFlag"]


# --- builds -------------------------------------------------------------------------------------


def test_tensorrt_10_build_sets_int8_fp16_profiles_workspace_and_writes_everything(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    cfg = TensorRTEngineConfig(workspace_mib=512, opt_batch=16, max_batch=32)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert ("network_flags", 0) in calls and ("builder_flags", ["FP16", "INT8"]) in calls
    assert ("workspace", 512 << 20) in calls
    assert ("profiles", [{INPUT: ([1, 1, 8, 8], [16, 1, 8, 8], [32, 1, 8, 8])}]) in calls
    meta = json.loads((tmp_path / eng.META_FILE).read_text())
    assert meta == built.metadata and meta["tensorrt"] == TRT10 and meta["tensorrt_api"] == "weakly-typed"
    assert meta["sha256"] == eng.file_sha256(built.engine_path)
    assert meta["inputs"] == [{"name": INPUT, "shape": [-1, 1, 8, 8], "dtype": "float32"}]
    assert "parsed" in (tmp_path / eng.LOG_FILE).read_text()
    assert (tmp_path / eng.TIMING_CACHE_FILE).read_bytes() == b"+timings"


def test_tensorrt_11_build_is_strongly_typed_without_precision_flags(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT11, calls))
    built = eng.build_engine(qdq[1], tmp_path, "hopper-sm90-trt11", local=H100)
    # STRONGLY_TYPED is member 0 in TensorRT 11: the flags word is 1 << 0.
    assert ("network_flags", 1) in calls and ("builder_flags", []) in calls
    assert built.metadata["tensorrt_api"] == "strongly-typed"


def test_tensorrt_10_strongly_typed_on_request(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", TensorRTEngineConfig(strongly_typed=True), local=L4)
    assert ("network_flags", 1 << 1) in calls and ("builder_flags", []) in calls  # STRONGLY_TYPED is 1 in 10.x
    assert built.metadata["tensorrt_api"] == "strongly-typed" and built.metadata["strongly_typed"] is True


def test_tensorrt_8_5_build_on_xavier_uses_explicit_batch(tmp_path, monkeypatch):
    """TensorRT 8.5 is the documented API (not on PyPI): see tests/unit/test_trt_conformance.py. It parses
    opset 17 at most."""
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT8_5, calls, dla_cores=2))
    _, qdq17, _ = make_digits_onnx(tmp_path / "onnx", opset=17)
    eng.build_engine(qdq17, tmp_path, "xavier-sm72-jp5.1-trt8.5", TensorRTEngineConfig(dla_core=0), local=XAVIER)
    assert ("network_flags", 1 << 0) in calls and ("builder_flags", ["FP16", "GPU_FALLBACK", "INT8"]) in calls


def test_jetson_dla_build_with_gpu_fallback(qdq, tmp_path, monkeypatch):
    calls = []
    trt = mocked_tensorrt(TRT10_JETPACK6, calls, dla_cores=2)
    install(monkeypatch, trt)
    cfg = TensorRTEngineConfig(dla_core=1)
    eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", cfg, local=ORIN)
    assert ("builder_flags", ["FP16", "GPU_FALLBACK", "INT8"]) in calls
    assert ("default_device_type", trt.DeviceType.DLA) in calls and ("DLA_core", 1) in calls


def test_dla_core_the_device_lacks_is_refused(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10_JETPACK6, [], dla_cores=0))  # an Orin Nano has no DLA
    with pytest.raises(DeviceError, match="this device has 0 DLA core"):
        eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", TensorRTEngineConfig(dla_core=0), local=ORIN)


def test_wrong_tensorrt_on_the_build_node_is_refused_with_the_way_to_the_right_one(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10, []))
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "orin-sm87-jp6.1-trt10.3", local=ORIN)
    assert f"needs TensorRT 10.3; this node has TensorRT {TRT10}" in one_line(exc.value)
    assert "comes with JetPack 6.1" in str(exc.value)
    install(monkeypatch, mocked_tensorrt(TRT11, []))
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "hopper-sm90-trt10", local=H100)
    assert "pip install 'edgeslim[tensorrt10]'" in one_line(exc.value)


def test_same_compute_capability_before_10_9_is_refused_before_tensorrt_is_asked(qdq, tmp_path, monkeypatch):
    """Finding 1: HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY came with 10.9; 10.3 has none."""
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10_JETPACK6, calls))
    cfg = TensorRTEngineConfig(hardware_compatibility="same_compute_capability", device_classes=["ada-sm89-trt10"],
                               min_tensorrt={"ada-sm89-trt10": "10.9"})
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert one_line(exc.value) == ("engines.hardware_compatibility: same_compute_capability needs TensorRT 10.9 "
                                   "or newer; this node has TensorRT 10.3.0")
    assert calls == []
    trt = mocked_tensorrt(TRT10, calls)
    install(monkeypatch, trt)
    eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", cfg, local=L4)
    assert ("hardware_compatibility_level", trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY) in calls


def test_an_enum_member_this_tensorrt_lacks_is_one_line_not_an_attribute_error():
    trt = mocked_tensorrt(TRT11, [])
    with pytest.raises(DeviceError) as exc:
        tensorrt_calls.enum_member(trt, "BuilderFlag", "INT8")
    assert one_line(exc.value).startswith(f"TensorRT {TRT11} has no BuilderFlag.INT8")


def test_failed_build_points_at_the_log(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10, [], fail_build=True))
    with pytest.raises(DeviceError, match=r"no implementation for layer fc1; see build.log"):
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    assert "[ERROR] no implementation" in (tmp_path / eng.LOG_FILE).read_text()
    assert not (tmp_path / eng.ENGINE_FILE).exists()


def test_a_builder_tensorrt_cannot_create_is_one_line_with_the_log(qdq, tmp_path, monkeypatch):
    """Finding 3: without a usable driver the bindings raise TypeError (nullptr); it must not escape."""
    install(monkeypatch, mocked_tensorrt(TRT10, [], no_device=True))
    with pytest.raises(DeviceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    msg = one_line(exc.value)
    assert msg.startswith(f"TensorRT {TRT10} could not create its builder (TypeError: {NULLPTR}")
    assert "TensorRT log: [WARNING] CUDA initialization failure with error: 35" in msg


def test_a_parser_error_is_one_line_with_the_parsers_reason(qdq, tmp_path, monkeypatch):
    install(monkeypatch, mocked_tensorrt(TRT10, [], parse_errors=["Assertion failed: scale must be positive"]))
    with pytest.raises(SourceError) as exc:
        eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    msg = one_line(exc.value)
    assert msg.startswith(f"TensorRT {TRT10} cannot parse qdq.onnx: In node 1 with name: fc1")
    assert msg.endswith("Assertion failed: scale must be positive; see build.log")
    assert "[ERROR] ModelImporter.cpp" in (tmp_path / eng.LOG_FILE).read_text()


def test_engine_cache_hit_skips_the_build_and_timing_cache_is_reused(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    first = eng.build_engine(qdq[1], tmp_path / "a", "ada-sm89-trt10", local=L4, cache_dir=tmp_path / "cache")
    assert not first.cached and ("timing_cache_in", b"") in calls
    n = len(calls)
    again = eng.build_engine(qdq[1], tmp_path / "b", "ada-sm89-trt10", local=L4, cache_dir=tmp_path / "cache")
    assert again.cached and len(calls) == n and again.metadata["sha256"] == first.metadata["sha256"]
    other = eng.build_engine(qdq[1], tmp_path / "c", "ada-sm89-trt10", TensorRTEngineConfig(max_batch=8),
                             local=L4, cache_dir=tmp_path / "cache")
    assert not other.cached and ("timing_cache_in", b"+timings") in calls  # the class's timing cache
    assert other.metadata["timing_cache_reused"] is True


def test_a_timing_cache_tensorrt_refuses_is_replaced_by_an_empty_one(qdq, tmp_path, monkeypatch):
    calls = []
    install(monkeypatch, mocked_tensorrt(TRT10, calls))
    stale = tmp_path / "stale.cache"
    stale.write_bytes(b"timing cache of another GPU")
    built = eng.build_engine(qdq[1], tmp_path / "out", "ada-sm89-trt10", local=L4, timing_cache=stale)
    assert calls.index(("timing_cache_in", b"timing cache of another GPU")) < calls.index(("timing_cache_in", b""))
    log = (tmp_path / "out" / eng.LOG_FILE).read_text()
    assert "Timing cache header mismatch" in log and "does not match this TensorRT/GPU; starting empty" in log
    assert built.timing_cache_path.read_bytes() == b"+timings"
