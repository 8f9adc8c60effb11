"""The engine runner and the fallbacks to ONNX Runtime, against a mocked TensorRT generated from the real one.

There is no GPU here: trt_mocks.py's mocked ``tensorrt`` "builds" an engine whose bytes name the
ONNX, its execution context runs that ONNX with ONNX Runtime, and ``MockedCuda`` keeps "device
memory" in host buffers; it fails the way the real one does (a runtime that cannot be created, an
engine it cannot deserialize, an output numpy cannot hold, a failed run). Where TensorRT cannot
serve, the edge pyfunc, the device agent's health check and the agent's install fall back to ONNX
Runtime and say why. What this checks is edgeslim's side. Real runs: tests/gpu. The builder's
calls: test_engine_mocked_trt.py.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from test_engine_fixtures import INPUT, OUTPUT, make_digits_onnx
from trt_mocks import L4, NULLPTR, TRT10, add_mocked_runtime, install, mocked_tensorrt, one_line

from edgeslim.components.common.errors import DeviceError
from edgeslim.components.engine import builder as eng
from edgeslim.components.engine import runner as engine_runner
from edgeslim.components.engine import tensorrt_calls
from edgeslim.components.engine.config import TensorRTEngineConfig


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    return make_digits_onnx(tmp_path_factory.mktemp("onnx"))


# --- the runner ---------------------------------------------------------------------------------


def test_runner_splits_batches_at_the_profile_maximum(qdq, tmp_path, monkeypatch):
    from edgeslim.components.common.onnx_runtime import make_session as qdq_session, run_batched as run_session

    trt = add_mocked_runtime(mocked_tensorrt(TRT10, []))
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", TensorRTEngineConfig(max_batch=32), local=L4)
    runner = engine_runner.EngineRunner(built.engine_path, local=L4)
    x = qdq[2].x_test[:70]
    out = runner.run(x)[OUTPUT]
    assert runner.context._batches == [32, 32, 6]
    np.testing.assert_allclose(out, run_session(qdq_session(qdq[1]), x), rtol=1e-5, atol=1e-5)
    assert runner.backend == "tensorrt:ada-sm89-trt10"


def test_runner_pads_a_fixed_batch_engine(qdq, tmp_path, monkeypatch):
    trt = add_mocked_runtime(mocked_tensorrt(TRT10, []), static_batch=4)
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    runner = engine_runner.EngineRunner(built.engine_path, local=L4)
    out = runner.run({INPUT: qdq[2].x_test[:6]})[OUTPUT]
    assert out.shape == (6, 10) and runner.context._batches == [4, 4]


def test_runner_reports_an_engine_tensorrt_cannot_load(qdq, tmp_path, monkeypatch):
    trt = add_mocked_runtime(mocked_tensorrt(TRT10, []))
    install(monkeypatch, trt)
    built = eng.build_engine(qdq[1], tmp_path, "ada-sm89-trt10", local=L4)
    built.engine_path.write_bytes(b"garbage")
    with pytest.raises(DeviceError, match="sha256 differs from its metadata"):
        engine_runner.EngineRunner(built.engine_path, local=L4)
    meta = dict(built.metadata, sha256=eng.file_sha256(built.engine_path))  # intact bytes, unloadable
    with pytest.raises(DeviceError, match=r"cannot deserialize .*\[ERROR\] Serialization assertion failed"):
        engine_runner.EngineRunner(built.engine_path, meta, local=L4)


@pytest.fixture
def built_engine(qdq, tmp_path, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [])))
    return eng.build_engine(qdq[1], tmp_path / "engine", "ada-sm89-trt10", local=L4)


def test_a_runtime_tensorrt_cannot_create_is_one_line(built_engine, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [], no_device=True)))
    with pytest.raises(DeviceError) as exc:
        engine_runner.EngineRunner(built_engine.engine_path, local=L4)
    assert one_line(exc.value).startswith(f"TensorRT {TRT10} could not create its runtime (TypeError: {NULLPTR}")


def test_an_engine_output_numpy_cannot_hold_is_refused_at_load(built_engine, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, []), output_dtype="BF16"))
    with pytest.raises(DeviceError) as exc:
        engine_runner.EngineRunner(built_engine.engine_path, local=L4)
    assert "tensor 'output' is DataType.BF16, which numpy cannot hold" in one_line(exc.value)


def test_a_failed_run_is_one_line_with_the_cuda_error(built_engine, qdq, monkeypatch):
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, []), fail_execute=True))
    runner = engine_runner.EngineRunner(built_engine.engine_path, local=L4)
    with pytest.raises(DeviceError) as exc:
        runner.run(qdq[2].x_test[:4])
    assert "CUDA error 700" in one_line(exc.value)


# --- the fallbacks: the edge pyfunc and the device agent's health check -----------------------------


def test_edge_pyfunc_falls_back_to_onnxruntime_and_says_so(built_engine, qdq, tmp_path, monkeypatch):
    """Finding 3: a runtime TensorRT cannot create made the pyfunc fail instead of serving the ONNX."""
    import shutil

    from edgeslim.plugins import edge_flavor as flavor

    model = tmp_path / "model"
    shutil.copytree(built_engine.engine_path.parent, model / flavor.ENGINES_DIR / "ada-sm89-trt10")
    shutil.copyfile(qdq[1], model / flavor.MODEL_FILE)
    monkeypatch.setattr(flavor, "_flavor_conf", lambda root: {})  # a bare folder: no MLmodel
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [], no_device=True)))
    m = flavor.EdgeModel(model, local=L4, tensorrt_version=TRT10)
    out = m.predict(qdq[2].x_test[:4])
    assert out["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt:ada-sm89-trt10)"
    assert out[OUTPUT].shape == (4, 10)
    assert m.choice.reason.startswith("ONNX Runtime: TensorRT engine ada-sm89-trt10 unusable: TensorRT")
    assert NULLPTR in m.choice.reason
    install(monkeypatch, add_mocked_runtime(mocked_tensorrt(TRT10, [])))
    assert flavor.EdgeModel(model, local=L4, tensorrt_version=TRT10).backend == "tensorrt:ada-sm89-trt10"


def test_health_check_falls_back_to_onnxruntime_and_says_so(qdq, tmp_path, monkeypatch):
    import shutil

    from edgeslim.components.common.onnx_runtime import make_session
    from edgeslim.deploy.agent import health
    from edgeslim.deploy.manifest import encode_array

    def no_device(engine_path):
        raise TypeError(NULLPTR)

    monkeypatch.setattr(health, "_importable", lambda module: True)
    monkeypatch.setattr(health, "_tensorrt_runner", no_device)
    shutil.copyfile(qdq[1], tmp_path / "model.onnx")
    (tmp_path / "model.engine").write_bytes(b"an engine this device cannot load")
    x = qdq[2].x_test[:2]
    y = make_session(tmp_path / "model.onnx", threads=1).run(None, {INPUT: x})[0]
    res = health.run_health_check(tmp_path, {"input": encode_array(x), "outputs": {OUTPUT: encode_array(y)}})
    assert res["ok"] and res["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt)"
    assert res["fallback"] == f"TensorRT engine unusable: TypeError: {NULLPTR}"

    # The TensorRT-only agent (edgeslim[agent-trt]) has no ONNX Runtime to fall back to: the check fails, saying why.
    monkeypatch.setattr(health, "_importable", lambda module: module == "tensorrt")
    res = health.run_health_check(tmp_path, {"input": encode_array(x), "outputs": {OUTPUT: encode_array(y)}})
    assert not res["ok"] and res["error"] == (f"TensorRT engine unusable: TypeError: {NULLPTR}; {health.NO_ONNXRUNTIME}")
    (tmp_path / "model.engine").unlink()
    res = health.run_health_check(tmp_path, {"input": encode_array(x), "outputs": {OUTPUT: encode_array(y)}})
    assert not res["ok"] and res["error"].startswith("the release has no TensorRT engine; this agent has no ONNX Runtime")


def test_device_agent_records_why_it_serves_with_onnxruntime(tmp_path, monkeypatch):
    """The agent on a local store: the engine it built cannot be loaded (health check falls back), then a
    build that fails; release.json and the published status say ONNX Runtime serves, and why."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "deploy"))
    from fleet_unit_helpers import ManifestWriter, golden_for, make_onnx, upload

    from edgeslim.deploy.agent import health
    from edgeslim.deploy.agent.device import Agent, AgentSettings
    from edgeslim.deploy.store import LocalStore

    def fake_build(onnx_path, out_dir, device_class, config=None):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.engine").write_bytes(b"an engine this device's TensorRT cannot load")
        return types.SimpleNamespace(engine_path=Path(out_dir) / "model.engine")

    def no_device(engine_path):
        raise TypeError(NULLPTR)

    monkeypatch.setattr(tensorrt_calls, "tensorrt_available", lambda: (True, "mocked"))
    monkeypatch.setattr(eng, "build_engine", fake_build)
    monkeypatch.setattr(health, "_importable", lambda module: True)
    monkeypatch.setattr(health, "_tensorrt_runner", no_device)
    from tests.fleet_trust import TrustKit

    kit = TrustKit(tmp_path / "keys", fleet="f")
    store = LocalStore(tmp_path / "store")
    writer = ManifestWriter(store, kit)
    agent = Agent(store=store, fleet="f", device_id="d0", device_class="cls-a", state_dir=tmp_path / "d0",
                  root=kit.root, settings=AgentSettings(poll_interval=0.01, heartbeat_interval=0.01,
                                                        health_in_process=True))
    agent.recover()
    model = make_onnx(tmp_path / "v1.onnx", seed=1)
    writer.send(upload(store, model), golden_for(model))
    assert agent.step() == "applied"
    release = json.loads((agent.state_dir / "current" / "release.json").read_text())
    assert release["backend"] == "onnxruntime"
    assert release["fallback"] == f"TensorRT engine unusable: TypeError: {NULLPTR}"
    status = json.loads((agent.state_dir / "status.json").read_text())
    assert status["current"]["fallback"] == release["fallback"]
    assert status["last"]["health"]["backend"] == "onnxruntime:CPUExecutionProvider (fallback from tensorrt)"

    def failed_build(*a, **k):
        raise DeviceError(f"TensorRT 10.3.0 could not create its builder (TypeError: {NULLPTR})")

    monkeypatch.setattr(eng, "build_engine", failed_build)
    other = make_onnx(tmp_path / "v2.onnx", seed=2)
    writer.send(upload(store, other), golden_for(other))
    assert agent.step() == "applied"
    release = json.loads((agent.state_dir / "current" / "release.json").read_text())
    assert release["backend"] == "onnxruntime"
    assert release["fallback"].startswith("TensorRT engine build failed: TensorRT 10.3.0 could not create its builder")
