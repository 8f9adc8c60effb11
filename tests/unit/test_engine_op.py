"""Engine tasks in the compiled pipeline: one per device class, each asking for a GPU and a node of its class."""

# No `from __future__ import annotations`: kfp reads the components' real annotations.

import json

import yaml
from kfp import compiler, dsl

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.kfp.ops import make_ops
from edgeslim.components.kfp.placement import apply_device_class_placement, parallel_items
from edgeslim.pipelines.edge_compression import compile_pipeline

ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
ADA_KEY = "ada-sm89-trt10"
CFG = TensorRTEngineConfig(device_classes=[ORIN_KEY, ADA_KEY],
                           node_selectors={ADA_KEY: {"nvidia.com/gpu.product": "NVIDIA-L4"}})


def _docs(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_parallel_items_carry_each_class_and_its_node_selector():
    assert parallel_items(CFG) == [
        {"device_class": ORIN_KEY, "node_selector": {"edgeslim.io/device-class": ORIN_KEY}},
        {"device_class": ADA_KEY, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
    ]


def test_each_engine_task_of_the_pipeline_asks_for_a_gpu_and_a_node_of_its_class(tmp_path):
    spec, platform = _docs(compile_pipeline(tmp_path / "p.yaml", engines=CFG))
    resources = spec["deploymentSpec"]["executors"]["exec-engine-build-op"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-engine-build-op"]["nodeSelector"]
    assert selector["nodeSelectorJson"]["componentInputParameter"].endswith("subvar-node_selector")
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert [i["device_class"] for i in items] == [ORIN_KEY, ADA_KEY]


def test_a_fixed_device_class_gets_its_selector_literally(tmp_path):
    ops = make_ops()

    @dsl.pipeline(name="engine-one-class")
    def pipeline(qdq: dsl.Input[dsl.Model], plan: dsl.Input[dsl.Artifact]):
        task = ops.engine_build_op(qdq_model=qdq, device_class=ADA_KEY, plan=plan)
        apply_device_class_placement(task, ADA_KEY, CFG)

    compiler.Compiler().compile(pipeline, str(tmp_path / "one.yaml"))
    _, platform = _docs(tmp_path / "one.yaml")
    selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-engine-build-op"]["nodeSelector"]
    assert selector == {"nodeSelectorJson": {"runtimeValue": {"constant": {"nvidia.com/gpu.product": "NVIDIA-L4"}}}}


def test_the_engine_component_reports_not_built_without_a_cuda_device(tmp_path):
    import pytest
    from test_engine_fixtures import make_digits_onnx

    from edgeslim.components.engine import devices
    from edgeslim.components.engine.builder import NOT_BUILT_NO_CUDA

    if devices.detect_local_device() is not None:
        pytest.skip("this machine has a CUDA device: the engine would really be built (tests/gpu covers that)")
    _, qdq, _ = make_digits_onnx(tmp_path / "onnx")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"engines_config": CFG.to_dict(), "data_provider": "sklearn-digits", "data_args": {},
                                "previous_model_uri": ""}))
    out_dir = tmp_path / "engines"

    def art(cls, path):
        return cls(name=path.name, uri=str(path), metadata={})

    out = json.loads(make_ops().engine_build_op.python_func(
        qdq_model=art(dsl.Model, qdq), device_class=ORIN_KEY, plan=art(dsl.Artifact, plan),
        engines=art(dsl.Model, out_dir)))
    assert out["device_class"] == ORIN_KEY and out["status"] == NOT_BUILT_NO_CUDA
    assert json.loads((out_dir / "engines.json").read_text())["engines"][ORIN_KEY]["status"] == NOT_BUILT_NO_CUDA
