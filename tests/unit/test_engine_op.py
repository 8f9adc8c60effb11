"""engine_op: placement of engine tasks (compiled IR) and a run through kfp's local runner."""

# No `from __future__ import annotations`: kfp reads the components' real annotations.

import json

import pytest
import yaml
from kfp import compiler, dsl

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.engine.builder import NOT_BUILT_NO_CUDA
from edgeslim.components.kfp.placement import apply_device_class_placement, engine_op, parallel_items

ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
ADA_KEY = "ada-sm89-trt10"
CFG = TensorRTEngineConfig(device_classes=[ORIN_KEY, ADA_KEY],
                           node_selectors={ADA_KEY: {"nvidia.com/gpu.product": "NVIDIA-L4"}})


@dsl.component
def qdq_from_path(src: str, qdq: dsl.Output[dsl.Model]):
    import shutil

    shutil.copyfile(src, qdq.path)


def compile_to_dicts(pipeline, tmp_path):
    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_parallel_items_carry_each_class_and_its_node_selector():
    assert parallel_items(CFG) == [
        {"device_class": ORIN_KEY, "node_selector": {"edgeslim.io/device-class": ORIN_KEY}},
        {"device_class": ADA_KEY, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
    ]


def test_each_engine_task_asks_for_a_gpu_and_a_node_of_its_class(tmp_path):
    @dsl.pipeline(name="engines-placement")
    def pipeline(src: str):
        q = qdq_from_path(src=src)
        with dsl.ParallelFor(parallel_items(CFG)) as item:
            task = engine_op(qdq_onnx=q.outputs["qdq"], device_class=item.device_class,
                             engines_config_json=json.dumps(CFG.to_dict()), data_provider="sklearn-digits",
                             data_args_json="{}")
            apply_device_class_placement(task, item, CFG)

    spec, platform = compile_to_dicts(pipeline, tmp_path)
    resources = spec["deploymentSpec"]["executors"]["exec-engine-op"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-engine-op"]["nodeSelector"]
    assert selector["nodeSelectorJson"]["componentInputParameter"].endswith("subvar-node_selector")
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert [i["device_class"] for i in items] == [ORIN_KEY, ADA_KEY]


def test_a_fixed_device_class_gets_its_selector_literally(tmp_path):
    @dsl.pipeline(name="engine-one-class")
    def pipeline(src: str):
        q = qdq_from_path(src=src)
        task = engine_op(qdq_onnx=q.outputs["qdq"], device_class=ADA_KEY,
                         engines_config_json=json.dumps(CFG.to_dict()), data_provider="sklearn-digits",
                         data_args_json="{}")
        apply_device_class_placement(task, ADA_KEY, CFG)

    _, platform = compile_to_dicts(pipeline, tmp_path)
    selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-engine-op"]["nodeSelector"]
    assert selector == {"nodeSelectorJson": {"runtimeValue": {"constant": {"nvidia.com/gpu.product": "NVIDIA-L4"}}}}


@pytest.mark.slow
def test_local_runner_without_cuda_reports_not_built(tmp_path):
    import kfp.local
    from test_engine_fixtures import make_digits_onnx

    from edgeslim.components.engine import devices

    if devices.detect_local_device() is not None:
        pytest.skip("this machine has a CUDA device: the engine would really be built (tests/gpu covers that)")
    _, qdq, _ = make_digits_onnx(tmp_path / "onnx")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline(name="engines-local")
    def pipeline(src: str) -> str:
        q = qdq_from_path(src=src)
        return engine_op(qdq_onnx=q.outputs["qdq"], device_class=ORIN_KEY,
                         engines_config_json=json.dumps(CFG.to_dict()), data_provider="sklearn-digits",
                         data_args_json="{}").outputs["Output"]

    out = json.loads(pipeline(src=str(qdq)).output)
    assert out["device_class"] == ORIN_KEY and out["status"] == NOT_BUILT_NO_CUDA
    summaries = list((tmp_path / "root").rglob("engines.json"))
    assert len(summaries) == 1
    assert json.loads(summaries[0].read_text())["engines"][ORIN_KEY]["status"] == NOT_BUILT_NO_CUDA
