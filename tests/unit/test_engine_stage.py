"""The engines stage: plain "not built" without CUDA, bad input on any machine, and the engine gate.

The gate is checked with real models under ONNX Runtime: the Q/DQ ONNX is the
reference, and the "engine" is another real model (the fp32 ONNX, which a
good int8 engine should agree with, or a deliberately damaged copy). Where
the stage itself needs an engine (build + runner), the TensorRT path is
mocked: ``mocked_tensorrt_build`` writes an ONNX as the "engine" and
``OrtStandInRunner`` runs it with ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_engine_fixtures import make_digits_onnx

from edgeslim.components.engine import builder as eng
from edgeslim.components.common.onnx_runtime import make_session
from edgeslim.components.engine import stage
from edgeslim.components.engine.config import EngineVerifyConfig, TensorRTEngineConfig
from edgeslim.components.common.errors import GateRejected, SourceError
from edgeslim.components.engine.devices import LocalDevice
from tests.spread import measured

ORIN_KEY = "orin-sm87-jp6.1-trt10.3"
ADA_KEY = "ada-sm89-trt10"
L4 = LocalDevice("NVIDIA L4", (8, 9), "12.8", "10.13.0.35")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    fp32, qdq, splits = make_digits_onnx(folder)
    # A damaged copy: fc1 weights rounded to a coarse grid, as a broken int8 engine would compute.
    m = onnx.load(str(fp32))
    for init in m.graph.initializer:
        if init.name == "w1":
            w = numpy_helper.to_array(init)
            step = np.abs(w).max() / 1.5
            init.CopyFrom(numpy_helper.from_array((np.round(w / step) * step).astype(np.float32), "w1"))
    damaged = folder / "damaged.onnx"
    onnx.save(m, str(damaged))
    return {"fp32": fp32, "qdq": qdq, "damaged": damaged, "splits": splits}


def ort_run(path):
    sess = make_session(path)
    names = [o.name for o in sess.get_outputs()]
    return lambda x: dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))


def test_sqnr_of_identical_outputs_is_infinite_and_noise_lowers_it():
    ref = np.random.default_rng(0).normal(size=(100, 10))
    assert stage.sqnr_db(ref, ref) == float("inf")
    noisy = ref + 0.1 * np.random.default_rng(1).normal(size=ref.shape)
    assert 15 < stage.sqnr_db(ref, noisy) < 25  # ~20 dB for 10% noise


def test_a_faithful_engine_passes_the_gate(models):
    check = stage.verify_engine(ort_run(models["fp32"]), models["qdq"], models["splits"], EngineVerifyConfig())
    assert check.passed, check.reasons
    assert measured("engine_verify.fp32_vs_qdq_top1_agreement", check.metrics["agreement"]) >= 0.99
    assert measured("engine_verify.fp32_vs_qdq_sqnr_db", check.metrics["sqnr_db"]) > 20
    assert check.metrics["samples"] == len(models["splits"].x_test)
    assert measured("engine_verify.engine_top1", check.metrics["engine_metric"]) > 90


def test_a_damaged_engine_fails_the_gate_with_reasons(models):
    check = stage.verify_engine(ort_run(models["damaged"]), models["qdq"], models["splits"],
                                EngineVerifyConfig(samples=200))
    assert not check.passed
    assert check.metrics["samples"] == 200
    assert any("agreement with the Q/DQ ONNX" in r for r in check.reasons)
    assert any(r.startswith("top-1 ") and "points below" in r for r in check.reasons)
    assert any("SQNR" in r for r in check.reasons)


def test_no_cuda_device_records_not_built_and_does_not_fail(models, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "detect_local_device", lambda: None)  # a CI runner or laptop
    cfg = TensorRTEngineConfig(device_classes=[ORIN_KEY, ADA_KEY])
    result = stage.build_engines(models["qdq"], cfg, data=models["splits"], out_dir=tmp_path)
    expected = "not built: no CUDA device; devices build it from the Q/DQ ONNX on first install"
    assert result.lineage["engines"] == {ORIN_KEY: expected, ADA_KEY: expected}
    assert result.metrics["engines_built"] == 0 and result.metrics["engines_not_built"] == 2
    summary = stage.read_summary(tmp_path)
    assert summary["engines"][ORIN_KEY]["status"] == expected
    assert summary["qdq_onnx_sha256"] == eng.file_sha256(models["qdq"])
    assert not list(tmp_path.rglob(eng.ENGINE_FILE))


def test_bad_input_fails_even_without_a_gpu(models, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "detect_local_device", lambda: None)
    with pytest.raises(SourceError, match="no QuantizeLinear/DequantizeLinear"):
        stage.build_engines(models["fp32"], TensorRTEngineConfig(device_classes=[ORIN_KEY]),
                            data=models["splits"], out_dir=tmp_path / "e")
    assert not (tmp_path / "e" / stage.SUMMARY_FILE).exists()


# --- the stage with the TensorRT calls mocked ------------------------------------------------


class OrtStandInRunner:
    """mocked TensorRT runner: the "engine" file is an ONNX model run by ONNX Runtime."""

    def __init__(self, engine_path, metadata=None, local=None):
        self.session = make_session(engine_path)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, x):
        return dict(zip(self.outputs, self.session.run(None, {self.session.get_inputs()[0].name: x})))

    def close(self):
        pass


def mocked_tensorrt_build(engine_onnx):
    """mocked TensorRT build: copies ``engine_onnx`` as the engine and writes real metadata."""

    def build(onnx_path, out_dir, device_class, config=None, *, local=None, **_):
        plan = eng.plan_build(onnx_path, device_class, config)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine_onnx, out_dir / eng.ENGINE_FILE)
        meta = eng.make_metadata(device_class=plan.device_class, local=local, tensorrt_version=local.tensorrt,
                                 info=plan.onnx, config=plan.config, profiles=plan.profiles,
                                 engine_sha256=eng.file_sha256(out_dir / eng.ENGINE_FILE),
                                 engine_bytes=(out_dir / eng.ENGINE_FILE).stat().st_size, build_seconds=0.0)
        (out_dir / eng.META_FILE).write_text(json.dumps(meta))
        return eng.BuiltEngine(out_dir / eng.ENGINE_FILE, meta)

    return build


def test_mocked_build_that_passes_keeps_engine_metadata_and_verification(models, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "build_engine", mocked_tensorrt_build(models["fp32"]))
    monkeypatch.setattr(stage, "EngineRunner", OrtStandInRunner)
    result = stage.build_engines(models["qdq"], TensorRTEngineConfig(device_classes=[ADA_KEY]),
                                 data=models["splits"], out_dir=tmp_path, local=L4)
    assert result.lineage["engines"] == {ADA_KEY: stage.STATUS_BUILT}
    assert result.metrics[f"engine.{ADA_KEY}.agreement"] >= 0.99
    assert (tmp_path / ADA_KEY / eng.ENGINE_FILE).is_file()
    verification = json.loads((tmp_path / ADA_KEY / stage.VERIFY_FILE).read_text())
    assert verification["passed"] is True
    assert stage.read_summary(tmp_path)["engines"][ADA_KEY]["metadata"]["device_class"] == ADA_KEY


def test_mocked_build_that_fails_the_gate_is_dropped_and_rejected(models, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "build_engine", mocked_tensorrt_build(models["damaged"]))
    monkeypatch.setattr(stage, "EngineRunner", OrtStandInRunner)
    with pytest.raises(GateRejected) as exc:
        stage.build_engines(models["qdq"], TensorRTEngineConfig(device_classes=[ADA_KEY]),
                            data=models["splits"], out_dir=tmp_path, local=L4)
    assert exc.value.exit_code == 3 and ADA_KEY in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / ADA_KEY / eng.ENGINE_FILE).exists()  # never registered
    status = stage.read_summary(tmp_path)["engines"][ADA_KEY]["status"]
    assert status.startswith("rejected by the engine gate: agreement with the Q/DQ ONNX")


def test_a_detectors_engine_is_judged_by_its_decoded_boxes(tmp_path):
    """The engine gate asks the model's task: a detector's engine agrees when it makes the Q/DQ ONNX's boxes."""
    import torch

    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.common.tasks import task_for, task_from_dict
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.reference.detector import DigitsDetector, default_heads, make_detection_splits

    data = make_detection_splits(seed=0, n_train=8, n_val=4, n_test=6)
    torch.manual_seed(0)
    model = DigitsDetector(width=8, head_hidden=8).eval()
    with torch.no_grad():
        model.head[0].cls[1].bias.fill_(0.5)  # an untrained detector that still makes boxes
    fp32 = export(model, OnnxExportConfig(), data=data, out_path=tmp_path / "det.onnx").model
    qdq = quantize(fp32, PTQQuantizeConfig(num_samples=8), data=data, out_dir=tmp_path / "q").model
    task = task_for(task_from_dict({"kind": "detection", "num_classes": 10, "score_threshold": 0.3,
                                    "decoder": {"heads": default_heads(), "max_detections": 5}}))
    same = stage.verify_engine(ort_run(qdq), qdq, data, EngineVerifyConfig(), task)
    assert same.passed and same.metrics["agreement"] == 1.0
    assert same.metrics["engine_metric"] == same.metrics["onnx_metric"]

    def no_scores(x):  # an engine whose class maps came out empty: no box survives the threshold
        out = ort_run(qdq)(x)
        return {k: (np.zeros_like(v) if k in {h["cls"] for h in default_heads()} else v) for k, v in out.items()}

    broken = stage.verify_engine(no_scores, qdq, data, EngineVerifyConfig(), task)
    assert not broken.passed and broken.metrics["agreement"] < 0.5
    assert any(r.startswith("agreement with the Q/DQ ONNX") for r in broken.reasons)
    assert broken.metrics["engine_metric"] == 0.0 <= broken.metrics["onnx_metric"]  # no box, no mAP
