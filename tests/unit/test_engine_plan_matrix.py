"""`engine plan` against every built-in device class, every version-gated setting, and a YOLOv8n-like and a
ResNet-like Q/DQ graph at opset 17 and 18: what some TensorRT release of the class cannot build is refused
in one line before a build node is asked.

The graphs are small and built here with the operators torch's exporter writes for those models (YOLOv8n:
Conv, Sigmoid, Mul, Split, MaxPool, Concat, Resize, Reshape, Transpose, Softmax, Sub, Add, Div; ResNet-18:
Conv, Relu, MaxPool, Add, ReduceMean, Reshape, Gemm), with Q/DQ pairs; their opset-17 forms come from the
export's own opset conversion and are checked against the opset-18 ones under ONNX Runtime.

The expected outcome comes from the facts the issue and NVIDIA's documents state, written out here apart
from the code's tables: the TensorRT releases each class admits, the release each setting came or went
with, and the opset ceilings (8.5: 17; 10.x: 20).
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.components.common.errors import ConfigError, SourceError
from edgeslim.components.engine import builder as eng
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.engine.devices import get_device_class, known_device_classes
from edgeslim.components.export import convert_opset

# The releases each built-in class admits (its TensorRT pin), the oracle of this test.
TEN = [(10, m) for m in range(17)]
RELEASES = {
    "orin-sm87-jp6.1-trt10.3": [(10, 3)], "orin-sm87-jp6.2-trt10.3": [(10, 3)], "xavier-sm72-jp5.1-trt8.5": [(8, 5)],
    "ada-sm89-trt10": TEN, "hopper-sm90-trt10": TEN, "hopper-sm90-trt11": [(11, m) for m in range(5)],
}
MAX_OPSET = {8: 17, 10: 20, 11: 20}  # onnx-tensorrt's tables; 11.0-11.4 are held to 10.x's 20


def has(setting: str, value, release: tuple[int, int], jetson: bool, dla_cores: int) -> bool:
    """Whether a build node with ``release`` can build ``setting: value`` (the documented facts)."""
    if setting == "hardware_compatibility" and value != "none":
        return not jetson and release >= ((10, 9) if value == "same_compute_capability" else (8, 6))
    if setting == "version_compatible" and value:
        return release >= (8, 6)
    if setting == "strongly_typed" and value is not None:
        return release >= (10, 0) if value else release < (11, 0)
    if setting == "precision" and value == "fp16":
        return release < (11, 0)
    if setting == "dla_core" and value is not None:
        return value < dla_cores and (release < (10, 8) or release >= (11, 4, 1))
    return True


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


def qdq_weight(name: str, w: np.ndarray) -> tuple[list, list]:
    """A per-channel int8 weight and its DequantizeLinear."""
    scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / 127 + 1e-8).astype(np.float32)
    q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")]
    return inits, [node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=0)]


def qdq_act(src: str, dst: str) -> tuple[list, list]:
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), f"{dst}_s"),
             numpy_helper.from_array(np.array(0, np.int8), f"{dst}_z")]
    return inits, [node("QuantizeLinear", [src, f"{dst}_s", f"{dst}_z"], [f"{dst}_q"]),
                   node("DequantizeLinear", [f"{dst}_q", f"{dst}_s", f"{dst}_z"], [dst])]


def model(name: str, nodes: list, inits: list, out_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


def resnet_like(rng) -> onnx.ModelProto:
    inits, nodes = [], []
    for part in (qdq_act("input", "x"), qdq_weight("w1", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                 qdq_weight("w2", rng.normal(size=(4, 4, 3, 3)).astype(np.float32)),
                 qdq_weight("fc", rng.normal(size=(5, 4)).astype(np.float32))):
        inits += part[0]
        nodes += part[1]
    inits += [numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
              numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
              numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    nodes += [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
              node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
              node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]), node("Add", ["c2", "p1"], ["a"]),
              node("Relu", ["a"], ["r2"]), node("ReduceMean", ["r2", "hw"], ["gap"], keepdims=1),
              node("Reshape", ["gap", "flat"], ["f"]), node("Gemm", ["f", "fc", "fc_b"], ["output"], transB=1)]
    return model("resnet_like", nodes, inits, ["batch", 5])


def yolo_like(rng) -> onnx.ModelProto:
    inits, nodes = [], []
    for part in (qdq_act("input", "x"), qdq_weight("w1", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                 qdq_weight("w2", rng.normal(size=(8, 4, 1, 1)).astype(np.float32))):
        inits += part[0]
        nodes += part[1]
    inits += [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
              numpy_helper.from_array(np.array([0, 2, 4, -1], np.int64), "dfl"),
              numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes += [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), node("Sigmoid", ["c1"], ["s1"]),
              node("Mul", ["c1", "s1"], ["silu"]),
              helper.make_node("Split", ["silu"], ["a", "b"], name="split", axis=1, num_outputs=2),
              node("MaxPool", ["b"], ["bp"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[1, 1]),
              node("Concat", ["a", "bp"], ["cat"], axis=1),
              node("Resize", ["cat", "", "scales"], ["up"], mode="nearest"),
              node("Conv", ["up", "w2"], ["head"]), node("Reshape", ["head", "dfl"], ["r"]),
              node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]), node("Softmax", ["t"], ["sm"], axis=-1),
              node("Sub", ["sm", "half"], ["d"]), node("Div", ["d", "two"], ["q"]),
              node("Add", ["q", "half"], ["output"])]
    return model("yolo_like", nodes, inits, ["batch", 4, 2, 256])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``{(name, opset): path}``: each graph at 18 and converted to 17 by the export's conversion."""
    import onnxruntime as ort

    tmp, rng = tmp_path_factory.mktemp("plan"), np.random.default_rng(0)
    out = {}
    x = rng.random((2, 3, 8, 8), dtype=np.float32)
    for name, make in (("yolov8n-like", yolo_like), ("resnet-like", resnet_like)):
        p18, p17 = tmp / f"{name}-18.onnx", tmp / f"{name}-17.onnx"
        onnx.save(make(rng), str(p18))
        shutil.copyfile(p18, p17)
        convert_opset(p17, 17)
        runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                for p in (p18, p17)]
        np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6, atol=1e-6)  # the same graph in opset 17
        out[(name, 18)], out[(name, 17)] = p18, p17
    return out


SETTINGS = [("precision", "int8"), ("precision", "fp16"), ("precision", "fp32"), ("strongly_typed", True),
            ("strongly_typed", False), ("version_compatible", True), ("hardware_compatibility", "ampere_plus"),
            ("hardware_compatibility", "same_compute_capability"), ("dla_core", 0), ("dla_core", 1)]


def test_the_oracle_knows_every_built_in_class():
    assert sorted(RELEASES) == known_device_classes()


@pytest.mark.parametrize("key", sorted(RELEASES))
def test_every_class_against_every_setting_and_both_exports(key, exports):
    dc = get_device_class(key)
    for (setting, value), ((name, opset), path) in itertools.product(SETTINGS, sorted(exports.items())):
        lacking = [r for r in RELEASES[key] if not has(setting, value, r, dc.is_jetson, dc.dla_cores)]
        too_new = opset > min(MAX_OPSET[r[0]] for r in RELEASES[key])
        where = f"{key}, {setting}: {value}, {name} opset {opset}"
        try:
            cfg = TensorRTEngineConfig(**{setting: value})
            plan = eng.plan_build(path, key, cfg)
        except (ConfigError, SourceError) as exc:
            line = str(exc)
            assert "\n" not in line and line, where
            if lacking or (setting == "dla_core" and value >= dc.dla_cores):
                assert isinstance(exc, ConfigError) and line.startswith(f"engines.{setting}"), (where, line)
            else:
                assert isinstance(exc, SourceError) and too_new, (where, line)
                assert f"is opset {opset}" in line and "parses opset 17 at most" in line, (where, line)
            continue
        assert not lacking and not too_new, f"{where}: planned, but a build node with {lacking} would refuse it"
        assert plan.tensorrt_versions == tuple(f"{a}.{b}" for a, b in RELEASES[key]), where


def test_same_compute_capability_on_a_class_with_10_3_in_its_range_names_the_build_nodes_it_needs(exports):
    path = exports[("resnet-like", 18)]
    cfg = TensorRTEngineConfig(hardware_compatibility="same_compute_capability")
    with pytest.raises(ConfigError) as exc:
        eng.plan_build(path, "ada-sm89-trt10", cfg)
    assert "a build node with 10.0-10.8 cannot build it: build it only on nodes with 10.9-10.16" in str(exc.value)
    narrowed = TensorRTEngineConfig(hardware_compatibility="same_compute_capability",
                                    min_tensorrt={"ada-sm89-trt10": "10.9"}, device_classes=["ada-sm89-trt10"])
    assert eng.plan_build(path, "ada-sm89-trt10", narrowed).tensorrt_versions[0] == "10.9"


def test_an_op_the_class_parser_lacks_is_refused_and_the_release_that_has_it_named(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    graph = helper.make_graph([node("LayerNormalization", ["input", "g", "b"], ["output"])], "ln", [x], [y], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "ln.onnx"))
    fp32 = TensorRTEngineConfig(precision="fp32")
    with pytest.raises(SourceError) as exc:
        eng.plan_build(tmp_path / "ln.onnx", "xavier-sm72-jp5.1-trt8.5", fp32)
    assert str(exc.value).startswith("ln.onnx has LayerNormalization, which TensorRT 8.5's ONNX parser does not "
                                     "support (device class xavier-sm72-jp5.1-trt8.5); TensorRT 8.6 parses "
                                     "LayerNormalization")
    assert eng.plan_build(tmp_path / "ln.onnx", "orin-sm87-jp6.1-trt10.3", fp32).onnx.opset == 17
    graph = helper.make_graph([helper.make_node("FusedGemm", ["input", "input"], ["output"], domain="com.microsoft")],
                              "contrib", [x], [y])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(m, str(tmp_path / "contrib.onnx"))
    with pytest.raises(SourceError, match=r"FusedGemm \(com.microsoft\), outside the ONNX domain"):
        eng.plan_build(tmp_path / "contrib.onnx", "ada-sm89-trt10", fp32)


def test_the_export_picks_an_opset_every_requested_class_parses():
    import yaml

    from edgeslim.components.recipe import recipe_from_dict
    from edgeslim.pipelines.demo import DEMO_RECIPE

    d = yaml.safe_load(DEMO_RECIPE.read_text())
    stages = [s for s in d["stages"] if "export" not in (s if isinstance(s, dict) else {s: 0})]
    d["stages"] = [{"export": {}}, *stages]
    d["engines"] = {"device_classes": ["orin-sm87-jp6.1-trt10.3", "ada-sm89-trt10"]}
    assert recipe_from_dict(d).export.opset == 18
    d["engines"]["device_classes"].append("xavier-sm72-jp5.1-trt8.5")
    assert recipe_from_dict(d).export.opset == 17
    d["stages"][0] = {"export": {"opset": 18}}
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict(d)
    assert str(exc.value) == ("export.opset: 18, but device class xavier-sm72-jp5.1-trt8.5's TensorRT parses opset 17 "
                              "at most; set export.opset: 17, or remove it and the export picks the highest opset "
                              "every class in engines.device_classes parses")
