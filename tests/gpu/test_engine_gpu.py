"""Real TensorRT engines from the demo's Q/DQ ONNX, on a real GPU.

Skipped, with the reason, where there is no CUDA device or no TensorRT
(``pip install 'edgeslim[tensorrt10]'``). On a GPU node of a known device class
these build the engine, run it, and check it against ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeslim.components.engine import devices
from edgeslim.components.engine import builder as eng
from edgeslim.components.engine.runner import EngineRunner
from edgeslim.components.engine.tensorrt_calls import tensorrt_available


def _skip_reason() -> str | None:
    local = devices.detect_local_device()
    if local is None:
        return "no CUDA device on this machine (no NVIDIA driver answered)"
    ok, why = tensorrt_available()
    if not ok:
        return why
    try:
        devices.detect_device_class(local)
    except Exception as exc:  # an unknown GPU: nothing to build for
        return str(exc)
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def demo_qdq(tmp_path_factory, device_class):
    """The demo's model, small: DigitsCNN trained briefly, exported at an opset the node's TensorRT parses
    (17 on Xavier's 8.5), quantized by edgeslim."""
    from edgeslim.components.reference.digits import DigitsCNN, train_classifier
    from edgeslim.components.common.stage_configs import DEFAULT_OPSET, OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.engine.config import TensorRTEngineConfig
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.common.data import load_data
    from edgeslim.components.recipe import engine_opset_ceilings

    folder = tmp_path_factory.mktemp("demo")
    data = load_data("sklearn-digits", {})
    model = train_classifier(DigitsCNN(width=16), data.x_train, data.y_train, epochs=5)
    opset = min(DEFAULT_OPSET, *engine_opset_ceilings(TensorRTEngineConfig(device_classes=[device_class])).values())
    fp32 = export(model, OnnxExportConfig(opset=opset), data=data, out_path=folder / "fp32.onnx").model
    qdq = quantize(fp32, PTQQuantizeConfig(num_samples=256), data=data, out_dir=folder / "q").model
    return qdq, data


@pytest.fixture(scope="module")
def device_class():
    return devices.detect_device_class().key


def test_engine_builds_runs_and_agrees_with_onnxruntime(demo_qdq, device_class, tmp_path):
    from edgeslim.components.engine.config import TensorRTEngineConfig
    from edgeslim.components.engine.stage import STATUS_BUILT, build_engines

    qdq, data = demo_qdq
    cfg = TensorRTEngineConfig(device_classes=[device_class], max_batch=128)
    result = build_engines(qdq, cfg, data=data, out_dir=tmp_path)
    assert result.lineage["engines"][device_class] == STATUS_BUILT
    assert result.metrics[f"engine.{device_class}.agreement"] >= 0.99
    assert result.metrics[f"engine.{device_class}.sqnr_db"] >= 20
    meta = json.loads((tmp_path / device_class / eng.META_FILE).read_text())
    assert meta["sha256"] == eng.file_sha256(tmp_path / device_class / eng.ENGINE_FILE)
    assert (tmp_path / device_class / eng.LOG_FILE).read_text().strip()


def test_timing_cache_and_engine_cache_are_reused(demo_qdq, device_class, tmp_path):
    qdq, _ = demo_qdq
    first = eng.build_engine(qdq, tmp_path / "a", device_class, cache_dir=tmp_path / "cache")
    assert not first.cached and first.timing_cache_path is not None
    again = eng.build_engine(qdq, tmp_path / "b", device_class, cache_dir=tmp_path / "cache")
    assert again.cached and again.metadata["sha256"] == first.metadata["sha256"]
    warm = eng.build_engine(qdq, tmp_path / "c", device_class, timing_cache=first.timing_cache_path)
    assert warm.metadata["timing_cache_reused"] is True


def test_runner_splits_large_batches_and_refuses_another_version(demo_qdq, device_class, tmp_path):
    qdq, data = demo_qdq
    from edgeslim.components.engine.config import TensorRTEngineConfig
    from edgeslim.components.engine.stage import qdq_session, run_session

    built = eng.build_engine(qdq, tmp_path, device_class, TensorRTEngineConfig(max_batch=16))
    runner = EngineRunner(built.engine_path)
    out = runner.run(data.x_test[:50])[runner.outputs[0]]
    ref = run_session(qdq_session(qdq), data.x_test[:50])
    assert out.shape == ref.shape and (out.argmax(1) == ref.argmax(1)).mean() >= 0.98
    runner.close()
    meta = dict(built.metadata, tensorrt="9.9.9")
    with pytest.raises(eng.DeviceError, match="built with TensorRT 9.9.9"):
        EngineRunner(built.engine_path, meta)


def test_pyfunc_runs_the_engine_when_it_matches(demo_qdq, device_class, tmp_path):
    from edgeslim.plugins.edge_flavor import EdgeModel, save_model

    qdq, data = demo_qdq
    built = eng.build_engine(qdq, tmp_path / "e", device_class)
    path = save_model(tmp_path / "m", qdq, engines={device_class: built})
    model = EdgeModel(path)
    out = model.predict(data.x_test[:32])
    assert out["backend"] == f"tensorrt:{device_class}"
    assert np.isfinite(next(v for k, v in out.items() if k != "backend")).all()
