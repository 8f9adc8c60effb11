"""A real fp32 ONNX classifier and its symmetric per-channel Q/DQ ONNX, without torch; and the
mocked ``tensorrt`` module, generated from the real bindings.

An MLP trained on scikit-learn's digits (a second or two), written as ONNX,
then quantized by ONNX Runtime's ``quantize_static`` in the Q/DQ format
TensorRT's explicit quantization wants. Other engine tests import
``make_digits_onnx``; the tests here check that the Q/DQ model is what the
builder and the gate expect.

``MockedTensorRT`` builds a stand-in ``tensorrt`` module from the snapshot of one
real TensorRT version (tests/unit/trt/snapshots, written from the PyPI bindings
by tests/unit/trt/generate_snapshots.py and checked against them by
tests/unit/test_trt_conformance.py): its enums are the real ones with their
real values, and a mocked class may define, and an object may be given, only
attributes the real class has. A fake one raises ``FakeAttribute``.
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslim.components.common.data import Splits

INPUT = "input"
OUTPUT = "output"


def digits_splits() -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=0.1, random_state=0, stratify=y_tr)
    return Splits(x_tr, y_tr, x_va, y_va, x_te, y_te, source="sklearn-digits")


def make_digits_onnx(folder: Path, splits: Splits | None = None, opset: int = 18) -> tuple[Path, Path, Splits]:
    """Write ``fp32.onnx`` and ``qdq.onnx`` (dynamic batch, default-domain ``opset``) into ``folder``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from sklearn.neural_network import MLPClassifier

    splits = splits or digits_splits()
    folder.mkdir(parents=True, exist_ok=True)
    mlp = MLPClassifier(hidden_layer_sizes=(48,), max_iter=200, random_state=0)
    with warnings.catch_warnings():  # 200 iterations reach ~97% on digits; convergence is not the point
        warnings.simplefilter("ignore")
        mlp.fit(splits.x_train.reshape(len(splits.x_train), -1), splits.y_train)
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w1.T, "w1"), (b1, "b1"), (w2.T, "w2"), (b2, "b2"))]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
    nodes = [
        helper.make_node("Reshape", [INPUT, "flat"], ["x"], name="flatten"),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], [OUTPUT], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    fp32 = folder / "fp32.onnx"
    onnx.save(model, str(fp32))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT: splits.x_train[i:i + 64]} for i in range(0, 256, 64)])

        def get_next(self):
            return next(self.batches, None)

    qdq = folder / "qdq.onnx"
    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return fp32, qdq, splits


def test_qdq_fixture_is_symmetric_and_per_channel(tmp_path):
    _, qdq, _ = make_digits_onnx(tmp_path)
    model = onnx.load(str(qdq))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all((zp == 0).all() for zp in zero_points)  # TensorRT wants symmetric
    # Per-channel weight scales: one scale per output unit of fc1 (48) and fc2 (10).
    scale_sizes = sorted({inits[n.input[1]].size for n in model.graph.node if n.op_type == "DequantizeLinear"})
    assert 48 in scale_sizes and 10 in scale_sizes


# --- the mocked tensorrt, generated from the real bindings ------------------------------------------

TRT_SNAPSHOTS = Path(__file__).resolve().parent / "trt" / "snapshots"


def trt_snapshot(version: str) -> dict:
    """The recorded API of one real TensorRT version (a file name in tests/unit/trt/snapshots)."""
    return json.loads((TRT_SNAPSHOTS / f"tensorrt-{version}.json").read_text())


class FakeAttribute(AssertionError):
    """A mocked ``tensorrt`` got a name the real TensorRT of its version does not have."""


class _Member:
    """An enum member as pybind11 makes it: ``.name``, ``int()``, equal only within its enum."""

    __slots__ = ("enum", "name", "value")

    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other) -> bool:
        return isinstance(other, _Member) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __str__(self) -> str:
        return f"{self.enum.split('.')[-1]}.{self.name}"

    __repr__ = __str__


def _enum(qualname: str, members: dict[str, int]) -> type:
    ns = {k: _Member(qualname, k, v) for k, v in members.items()}
    return type(qualname.split(".")[-1], (), {**ns, "__members__": dict(ns)})


class _MockedModule(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if not name.startswith("__") and name not in self.__dict__.get("_toplevel", (name,)):
            raise FakeAttribute(f"mocked tensorrt {self.__version__} got {name!r}, which the real module has not")
        super().__setattr__(name, value)


class MockedTensorRT:
    """A stand-in ``tensorrt`` module (``.module``) for one version, generated from its snapshot.

    ``base(name)`` is the base class of a mock of ``tensorrt.<name>``: subclasses may
    define only members the real class has, and their objects get only those attributes.
    """

    def __init__(self, version: str):
        import numpy as np

        snap = self.snapshot = trt_snapshot(version)
        module = self.module = _MockedModule("tensorrt", "mocked tensorrt, generated from its real bindings")
        object.__setattr__(module, "_toplevel", frozenset(snap["toplevel"]))
        module.__version__ = snap["version"]
        for name, members in snap["enums"].items():
            if "." not in name:
                setattr(module, name, _enum(name, members))

        def nptype(dtype):
            found = snap["nptype"].get(dtype.name)
            if found is None:  # what the real one says for BF16, FP8, INT4, FP4
                raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
            return np.dtype(found).type

        module.nptype = nptype

    def base(self, name: str) -> type:
        snap = self.snapshot
        if name not in snap["classes"]:
            raise FakeAttribute(f"TensorRT {snap['version']} has no class {name!r} (or it is not recorded)")
        allowed = frozenset(snap["classes"][name])
        version = snap["version"]

        class Mocked:
            def __init_subclass__(cls, **kwargs):
                super().__init_subclass__(**kwargs)
                fake = sorted(n for n in vars(cls) if not n.startswith("_") and n not in allowed)
                if fake:
                    raise FakeAttribute(f"mocked {name} defines {fake}, which TensorRT {version}'s {name} has not")

            def __setattr__(self, attr: str, value) -> None:
                if not attr.startswith("_") and attr not in allowed:
                    raise AttributeError(f"'{name}' object has no attribute '{attr}' (TensorRT {version})")
                object.__setattr__(self, attr, value)

        Mocked.__name__ = f"Mocked{name}"
        for key, members in snap["enums"].items():  # nested enums, e.g. ILogger.Severity
            if key.startswith(f"{name}."):
                setattr(Mocked, key.split(".", 1)[1], _enum(key, members))
        return Mocked
