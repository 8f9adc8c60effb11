"""The edge flavor on disk: Q/DQ ONNX + engines per device class, and the backend it picks.

No MLflow server here (tests/integration/test_edge_flavor_registry.py has
that); models are saved to and loaded from folders with mlflow's own pyfunc
loader. Engines are stand-in files with real metadata (this machine cannot
build one); a GPU node is described with ``LocalDevice``.
"""

from __future__ import annotations

import hashlib
import json

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.models import Model
from test_engine_fixtures import INPUT, OUTPUT, make_digits_onnx

from edgeslim.components.engine import builder as eng
from edgeslim.components.common.onnx_runtime import make_session, run_batched
from edgeslim.components.engine import stage
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import DeviceError
from edgeslim.components.engine.devices import LocalDevice, get_device_class
from edgeslim.plugins import edge_flavor as flavor
from tests.spread import measured

ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
ADA_KEY = "ada-sm89-trt10"
ORIN = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.1", l4t="36.4.0")
L4 = LocalDevice("NVIDIA L4", (8, 9), "12.8", "10.13.0.35")
ALL_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    fp32, qdq, splits = make_digits_onnx(tmp_path_factory.mktemp("onnx"))
    return {"fp32": fp32, "qdq": qdq, "splits": splits}


def stand_in_engine(folder, onnx_path, device_class, local, version):
    """An engine folder as build_engine writes it; the engine bytes are a stand-in (no GPU here)."""
    folder.mkdir(parents=True)
    blob = f"stand-in engine for {device_class}".encode()
    (folder / eng.ENGINE_FILE).write_bytes(blob)
    plan = eng.plan_build(onnx_path, device_class)
    meta = eng.make_metadata(device_class=get_device_class(device_class), local=local, tensorrt_version=version,
                             info=plan.onnx, config=plan.config, profiles=plan.profiles,
                             engine_sha256=hashlib.sha256(blob).hexdigest(), engine_bytes=len(blob),
                             build_seconds=0.1)
    (folder / eng.META_FILE).write_text(json.dumps(meta))
    (folder / eng.LOG_FILE).write_text("[INFO] stand-in build log\n")
    return folder


def test_save_without_engines_stays_backward_compatible(models, tmp_path):
    path = flavor.save_model(tmp_path / "m", models["qdq"], metadata={"recipe": "abc"})
    assert (path / "model.onnx").read_bytes() == models["qdq"].read_bytes()
    meta = json.loads((path / "edge_meta.json").read_text())
    assert meta["recipe"] == "abc" and meta["engines"] == {}
    conf = Model.load(str(path / "MLmodel")).flavors
    assert conf["edgeslim_edge"]["engines"] == {} and "python_function" in conf


def test_pyfunc_runs_the_qdq_onnx_in_qdq_semantics_on_cpu(models, tmp_path):
    path = flavor.save_model(tmp_path / "m", models["qdq"])
    pyfunc = mlflow.pyfunc.load_model(str(path))
    x, y = models["splits"].x_test, models["splits"].y_test
    out = pyfunc.predict(x)
    assert out["backend"] == "onnxruntime:CPUExecutionProvider"
    expected = run_batched(make_session(models["qdq"]), x)
    np.testing.assert_allclose(out[OUTPUT], expected, rtol=1e-5, atol=1e-5)
    # 0.975 in every run: an sklearn MLP, so torch's kernels and seeds do not reach it
    assert measured("flavor.tiny_qdq_top1", (out[OUTPUT].argmax(1) == y).mean()) > 0.9
    by_name = pyfunc.predict({INPUT: x[:4]})
    np.testing.assert_allclose(by_name[OUTPUT], expected[:4], rtol=1e-5, atol=1e-5)


def test_engines_are_stored_per_device_class_with_metadata(models, tmp_path):
    orin = stand_in_engine(tmp_path / "b" / ORIN_KEY, models["qdq"], ORIN_KEY, ORIN, "10.3.0.30")
    path = flavor.save_model(tmp_path / "m", models["qdq"],
                             engines={ORIN_KEY: orin, ADA_KEY: eng.NOT_BUILT_NO_CUDA})
    stored = path / "engines" / ORIN_KEY
    assert (stored / "model.engine").read_bytes() == (orin / "model.engine").read_bytes()
    assert json.loads((stored / "metadata.json").read_text())["device_class"] == ORIN_KEY
    assert (stored / "build.log").is_file()
    assert not (path / "engines" / ADA_KEY).exists()
    meta = json.loads((path / "edge_meta.json").read_text())
    assert meta["engines"] == {ORIN_KEY: stage.STATUS_BUILT, ADA_KEY: eng.NOT_BUILT_NO_CUDA}
    conf = Model.load(str(path / "MLmodel")).flavors["edgeslim_edge"]
    assert conf["engines"] == {ORIN_KEY: f"engines/{ORIN_KEY}"}
    # On this CPU-only machine the pyfunc still runs, on ONNX Runtime, and says so.
    out = mlflow.pyfunc.load_model(str(path)).predict(models["splits"].x_test[:8])
    assert out["backend"] == "onnxruntime:CPUExecutionProvider" and out[OUTPUT].shape == (8, 10)


def test_build_engines_out_dir_is_accepted_with_its_statuses(models, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "detect_local_device", lambda: None)
    result = stage.build_engines(models["qdq"], TensorRTEngineConfig(device_classes=[ORIN_KEY]),
                                 data=models["splits"], out_dir=tmp_path / "engines")
    path = flavor.save_model(tmp_path / "m", models["qdq"], engines=result.model)
    assert json.loads((path / "edge_meta.json").read_text())["engines"] == {ORIN_KEY: eng.NOT_BUILT_NO_CUDA}
    assert flavor.engine_status_tags({ORIN_KEY: eng.NOT_BUILT_NO_CUDA}) == {
        f"edgeslim.engine.{ORIN_KEY}": eng.NOT_BUILT_NO_CUDA}


@pytest.mark.parametrize("damage, words", [
    ("other-onnx", "was built from another ONNX"),
    ("other-class", "is for 'orin-sm87-jp6.1-trt10.3', not 'ada-sm89-trt10'"),
    ("tampered", "sha256 differs from its metadata.json"),
])
def test_a_wrong_engine_is_refused_and_nothing_is_left(models, tmp_path, damage, words):
    onnx_for_engine = models["fp32"] if damage == "other-onnx" else models["qdq"]
    cfg_onnx_ok = damage != "other-onnx"
    src = tmp_path / "b"
    if cfg_onnx_ok:
        folder = stand_in_engine(src, onnx_for_engine, ORIN_KEY, ORIN, "10.3.0.30")
    else:  # an fp16 engine of the fp32 ONNX, offered as the engine of the Q/DQ ONNX
        folder = src
        folder.mkdir()
        blob = b"fp16 engine"
        (folder / "model.engine").write_bytes(blob)
        plan = eng.plan_build(onnx_for_engine, ORIN_KEY, TensorRTEngineConfig(precision="fp16"))
        meta = eng.make_metadata(device_class=plan.device_class, local=ORIN, tensorrt_version="10.3.0.30",
                                 info=plan.onnx, config=plan.config, profiles=plan.profiles,
                                 engine_sha256=hashlib.sha256(blob).hexdigest(), engine_bytes=len(blob),
                                 build_seconds=0)
        (folder / "metadata.json").write_text(json.dumps(meta))
    if damage == "tampered":
        (folder / "model.engine").write_bytes(b"something else")
    key = ADA_KEY if damage == "other-class" else ORIN_KEY
    with pytest.raises(DeviceError) as exc:
        flavor.save_model(tmp_path / "m", models["qdq"], engines={key: folder})
    assert words in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "m").exists()


# --- backend choice ---------------------------------------------------------------------------


def engine_meta(models, key, local, version):
    plan = eng.plan_build(models["qdq"], key)
    return eng.make_metadata(device_class=get_device_class(key), local=local, tensorrt_version=version,
                             info=plan.onnx, config=plan.config, profiles=plan.profiles,
                             engine_sha256="0" * 64, engine_bytes=1, build_seconds=0)


def test_matching_engine_with_tensorrt_present_runs_on_tensorrt(models):
    engines = {ORIN_KEY: engine_meta(models, ORIN_KEY, ORIN, "10.3.0.30"),
               ADA_KEY: engine_meta(models, ADA_KEY, L4, "10.13.0.35")}
    choice = flavor.choose_backend(engines, tensorrt_version="10.13.0.35", local=L4, available_providers=ALL_EPS)
    assert (choice.kind, choice.device_class) == ("tensorrt", ADA_KEY)
    choice = flavor.choose_backend(engines, tensorrt_version="10.3.0.30", local=ORIN, available_providers=ALL_EPS)
    assert (choice.kind, choice.device_class) == ("tensorrt", ORIN_KEY)


def test_fallback_order_is_tensorrt_ep_then_cuda_ep_then_cpu(models):
    engines = {ORIN_KEY: engine_meta(models, ORIN_KEY, ORIN, "10.3.0.30")}
    # A GPU whose TensorRT differs from the engine's: no engine fits, ONNX Runtime's GPU providers do.
    choice = flavor.choose_backend(engines, tensorrt_version="10.13.0.35", local=L4,
                                   available_providers=list(reversed(ALL_EPS)))
    assert choice.kind == "onnxruntime" and choice.providers == tuple(ALL_EPS)
    assert "no engine matches this GPU" in choice.reason
    choice = flavor.choose_backend(engines, tensorrt_version=None, local=L4,
                                   available_providers=["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert choice.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert "TensorRT is not installed" in choice.reason


def test_without_a_cuda_device_only_the_cpu_provider_is_used(models):
    engines = {ORIN_KEY: engine_meta(models, ORIN_KEY, ORIN, "10.3.0.30")}
    choice = flavor.choose_backend(engines, tensorrt_version="10.3.0.30", local=None, available_providers=ALL_EPS)
    assert choice.providers == ("CPUExecutionProvider",) and choice.reason == "ONNX Runtime: no CUDA device"


def test_jetpack_mismatch_and_forced_onnxruntime(models):
    engines = {ORIN_KEY: engine_meta(models, ORIN_KEY, ORIN, "10.3.0.30")}
    jp62 = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.2", l4t="36.4.3")
    assert flavor.choose_backend(engines, tensorrt_version="10.3.0.30", local=jp62,
                                 available_providers=ALL_EPS).kind == "onnxruntime"
    forced = flavor.choose_backend(engines, tensorrt_version="10.3.0.30", local=ORIN,
                                   available_providers=ALL_EPS, force="onnxruntime")
    assert forced.kind == "onnxruntime" and "EDGESLIM_EDGE_BACKEND" in forced.reason


def test_unusable_engine_falls_back_to_onnxruntime(models, tmp_path, monkeypatch):
    """A GPU node (described) whose engine matches, but TensorRT cannot be imported here."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    orin = stand_in_engine(tmp_path / "b" / ORIN_KEY, models["qdq"], ORIN_KEY, ORIN, "10.3.0.30")
    path = flavor.save_model(tmp_path / "m", models["qdq"], engines={ORIN_KEY: orin})
    model = flavor.EdgeModel(path, local=ORIN, tensorrt_version="10.3.0.30")
    assert model.backend == "onnxruntime:CPUExecutionProvider"
    assert model.predict(models["splits"].x_test[:3])[OUTPUT].shape == (3, 10)


def test_timing_cache_travels_with_the_model_for_the_next_build(models, tmp_path):
    orin = stand_in_engine(tmp_path / "b" / ORIN_KEY, models["qdq"], ORIN_KEY, ORIN, "10.3.0.30")
    (orin / eng.TIMING_CACHE_FILE).write_bytes(b"tactic timings")
    path = flavor.save_model(tmp_path / "m", models["qdq"], engines={ORIN_KEY: orin})
    caches = flavor.timing_caches_from(path)
    assert list(caches) == [ORIN_KEY] and caches[ORIN_KEY].read_bytes() == b"tactic timings"
