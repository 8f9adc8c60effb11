"""Engine tasks in the compiled pipeline: one per device class, each on its platform's image (arm64 for
Jetson, x86_64 otherwise), asking for a GPU and a node of its class and architecture, tolerating GPU taints."""

# No `from __future__ import annotations`: kfp reads the components' real annotations.

import base64
import json

import pytest
import yaml
from kfp import compiler, dsl

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.engine.devices import get_device_class, known_device_classes
from edgeslim.components.kfp.ops import DEFAULT_ENGINE_IMAGE, make_ops
from edgeslim.components.kfp.placement import apply_device_class_placement
from edgeslim.pipelines.edge_compression import compile_pipeline

ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
ADA_KEY = "ada-sm89-trt10"
CFG = TensorRTEngineConfig(device_classes=[ORIN_KEY, ADA_KEY],
                           node_selectors={ADA_KEY: {"nvidia.com/gpu.product": "NVIDIA-L4"}})
# The recipe's own tolerations replace the default one.
TOLERATING = TensorRTEngineConfig(device_classes=[ADA_KEY], node_selectors=CFG.node_selectors,
                                  tolerations=[{"key": "dedicated", "operator": "Equal", "value": "gpu",
                                                "effect": "NoExecute"}])
GPU_TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _docs(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def engine_tasks(spec, platform) -> dict:
    """device class -> (image, container resources, kubernetes executor config) of its engine task."""
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    out = {}
    for task in spec["root"]["dag"]["tasks"].values():
        if not task["componentRef"]["name"].startswith("comp-engine-build-op"):
            continue
        key = task["inputs"]["parameters"]["device_class"]["runtimeValue"]["constant"]
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = executors[label]["container"]
        out[key] = (container["image"], container.get("resources", {}), k8s.get(label, {}), task["taskInfo"]["name"])
    return out


@pytest.fixture(scope="module")
def every_class(tmp_path_factory):
    """The engine tasks of a pipeline compiled for every built-in class (one compile for the module)."""
    cfg = TensorRTEngineConfig(device_classes=known_device_classes(), node_selectors=CFG.node_selectors,
                               images={"hopper-sm90-trt11": "registry.example/trt11:1"})
    return engine_tasks(*_docs(compile_pipeline(tmp_path_factory.mktemp("ir") / "p.yaml", engines=cfg)))


def test_every_class_gets_a_task_on_its_architectures_image_with_its_node_gpu_and_tolerations(every_class):
    """Jetson classes on arm64 L4T images, the others on x86_64 TensorRT ones; nvidia.com/gpu taints tolerated."""
    assert sorted(every_class) == known_device_classes()
    for key, (image, resources, k8s, name) in every_class.items():
        dc = get_device_class(key)
        assert name == f"engine {key}"
        if dc.is_jetson:
            assert image.endswith(f"-jetpack{dc.jetpack}"), (key, image)
        elif key == "hopper-sm90-trt11":
            assert image == "registry.example/trt11:1"  # engines.images
        else:
            assert image == DEFAULT_ENGINE_IMAGE, (key, image)
        selector = k8s["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"]
        assert selector == {"kubernetes.io/arch": "arm64" if dc.is_jetson else "amd64",
                            **CFG.node_selectors.get(key, dc.node_selector)}, key
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu" and resources["accelerator"]["resourceCount"] == "1"
        assert k8s["tolerations"] == GPU_TAINT, key


def test_an_orin_and_an_ada_class_land_on_arm64_and_x86_images(every_class):
    (orin_image, _, orin, _), (ada_image, _, ada, _) = every_class[ORIN_KEY], every_class[ADA_KEY]
    assert orin_image.endswith("-jetpack6.1") and ada_image == DEFAULT_ENGINE_IMAGE != orin_image
    assert orin["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"] == {
        "kubernetes.io/arch": "arm64", "edgeslim.io/device-class": ORIN_KEY}
    assert ada["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"] == {
        "kubernetes.io/arch": "amd64", "nvidia.com/gpu.product": "NVIDIA-L4"}


def test_a_fixed_device_class_gets_its_selector_literally(tmp_path):
    ops = make_ops()

    @dsl.pipeline(name="engine-one-class")
    def pipeline(qdq: dsl.Input[dsl.Model], plan: dsl.Input[dsl.Artifact]):
        task = ops.engine_build_op(qdq_model=qdq, device_class=ADA_KEY, plan=plan)
        apply_device_class_placement(task, ADA_KEY, TOLERATING)

    compiler.Compiler().compile(pipeline, str(tmp_path / "one.yaml"))
    _, platform = _docs(tmp_path / "one.yaml")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-engine-build-op"]
    assert k8s["nodeSelector"] == {"nodeSelectorJson": {"runtimeValue": {"constant": {
        "kubernetes.io/arch": "amd64", "nvidia.com/gpu.product": "NVIDIA-L4"}}}}
    assert k8s["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}]


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

    out = json.loads(base64.b64decode(make_ops().engine_build_op.python_func(
        qdq_model=art(dsl.Model, qdq), device_class=ORIN_KEY, plan=art(dsl.Artifact, plan),
        engines=art(dsl.Model, out_dir))))
    assert out["device_class"] == ORIN_KEY and out["status"] == NOT_BUILT_NO_CUDA
    assert json.loads((out_dir / "engines.json").read_text())["engines"][ORIN_KEY]["status"] == NOT_BUILT_NO_CUDA


def test_a_failed_gate_plans_no_engines_whatever_the_per_class_settings(tmp_path):
    import yaml

    from edgeslim.components.recipe import recipe_from_dict
    from edgeslim.pipelines.demo import DEMO_RECIPE

    d = yaml.safe_load(DEMO_RECIPE.read_text())
    d["engines"].update(device_classes=[ORIN_KEY, ADA_KEY], min_tensorrt={ADA_KEY: "10.9"},
                        images={ORIN_KEY: "registry.example/edgeslim:jetson"})
    (tmp_path / "parent.json").write_text(json.dumps({"name": "digits-teacher"}))
    (tmp_path / "verdict.json").write_text(json.dumps({"passed": False}))

    def art(path):
        return dsl.Artifact(name=path.name, uri=str(path), metadata={})

    make_ops().plan_engines_op.python_func(
        recipe_json=recipe_from_dict(d).to_json(), parent=art(tmp_path / "parent.json"),
        verdict=art(tmp_path / "verdict.json"), plan=art(tmp_path / "plan.json"))
    planned = TensorRTEngineConfig.from_dict(json.loads((tmp_path / "plan.json").read_text())["engines_config"])
    assert planned.device_classes == [] and planned.min_tensorrt == {} and planned.images == {}
