"""The edge model through a real MLflow registry, on a CPU-only machine.

A real ``mlflow server`` (SQLite backend, local artifact store) runs as a
subprocess on loopback. A Q/DQ ONNX with one engine folder and one "not
built" class is logged with the flavor, registered, aliased
``edge-candidate``, and loaded back with
``mlflow.pyfunc.load_model("models:/NAME@edge-candidate")``.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from tests.conftest import running_mlflow_server

pytestmark = pytest.mark.slow

ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
ADA_KEY = "ada-sm89-trt10"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking + registry server on 127.0.0.1, stopped after the module. Yields the URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server.uri


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    """A small symmetric per-channel Q/DQ ONNX (dynamic batch) and sample inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("onnx")
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.3, (32, 16)).astype(np.float32), rng.normal(0, 0.3, (4, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1"], ["h"], transB=1),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["output"], transB=1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    fp32, qdq = folder / "fp32.onnx", folder / "qdq.onnx"
    onnx.save(model, str(fp32))
    x = rng.normal(size=(64, 16)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return qdq, x


def _engine_folder(folder, qdq, device_class):
    """An engine folder as build_engine writes it; the bytes stand in for a GPU-built engine."""
    from edgeslim.components.engine import builder as eng
    from edgeslim.components.engine.devices import LocalDevice, get_device_class

    folder.mkdir(parents=True)
    blob = b"stand-in serialized engine"
    (folder / eng.ENGINE_FILE).write_bytes(blob)
    plan = eng.plan_build(qdq, device_class)
    orin = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.1", l4t="36.4.0")
    meta = eng.make_metadata(device_class=get_device_class(device_class), local=orin,
                             tensorrt_version="10.3.0.30", info=plan.onnx, config=plan.config,
                             profiles=plan.profiles, engine_sha256=hashlib.sha256(blob).hexdigest(),
                             engine_bytes=len(blob), build_seconds=0.1)
    (folder / eng.META_FILE).write_text(json.dumps(meta))
    (folder / eng.TIMING_CACHE_FILE).write_bytes(b"stand-in timing cache")
    return folder


def test_registered_edge_model_loads_by_alias_and_runs_on_cpu(mlflow_server, qdq_model, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from edgeslim.components.engine.builder import NOT_BUILT_NO_CUDA
    from edgeslim.components.common.onnx_runtime import make_session as qdq_session, run_batched as run_session
    from edgeslim.plugins import edge_flavor

    qdq, x = qdq_model
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("edge-flavor-registry")
    engine = _engine_folder(tmp_path / ORIN_KEY, qdq, ORIN_KEY)
    with mlflow.start_run():
        info = edge_flavor.log_model(qdq, name="model", metadata={"recipe_digest": "0123abcd"},
                                     engines={ORIN_KEY: engine, ADA_KEY: NOT_BUILT_NO_CUDA})
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, "tiny-edge")
    client.set_registered_model_alias("tiny-edge", "edge-candidate", version.version)

    model = mlflow.pyfunc.load_model("models:/tiny-edge@edge-candidate")
    out = model.predict(x)
    assert out["backend"] == "onnxruntime:CPUExecutionProvider"
    np.testing.assert_allclose(out["output"], run_session(qdq_session(qdq), x), rtol=1e-5, atol=1e-5)

    local = mlflow.artifacts.download_artifacts("models:/tiny-edge@edge-candidate", dst_path=str(tmp_path / "dl"))
    meta = json.loads(open(os.path.join(local, "engines", ORIN_KEY, "metadata.json")).read())
    assert meta["device_class"] == ORIN_KEY and meta["tensorrt"] == "10.3.0.30"
    edge_meta = json.loads(open(os.path.join(local, "edge_meta.json")).read())
    assert edge_meta["engines"][ADA_KEY] == NOT_BUILT_NO_CUDA
    assert edge_meta["recipe_digest"] == "0123abcd"
    logged = mlflow.get_logged_model(info.model_id)
    assert logged.tags[f"edgeslim.engine.{ADA_KEY}"] == NOT_BUILT_NO_CUDA
    assert logged.tags[f"edgeslim.engine.{ORIN_KEY}"] == "built and verified"


def test_next_build_finds_the_timing_cache_of_the_registered_version(mlflow_server, qdq_model, tmp_path):
    import mlflow

    from edgeslim.plugins import edge_flavor
    from edgeslim.components.engine.stage import previous_timing_caches

    qdq, _ = qdq_model
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("edge-flavor-timing-cache")
    with mlflow.start_run():
        info = edge_flavor.log_model(qdq, engines={ORIN_KEY: _engine_folder(tmp_path / ORIN_KEY, qdq, ORIN_KEY)})
    version = mlflow.register_model(info.model_uri, "tiny-edge-tc")
    mlflow.MlflowClient().set_registered_model_alias("tiny-edge-tc", "edge-stable", version.version)

    found = previous_timing_caches("models:/tiny-edge-tc@edge-stable", ORIN_KEY)
    assert open(found[ORIN_KEY], "rb").read() == b"stand-in timing cache"
    assert previous_timing_caches("models:/tiny-edge-tc@edge-stable", ADA_KEY) == {}
    assert previous_timing_caches("models:/no-such-model@edge-stable", ORIN_KEY) == {}
