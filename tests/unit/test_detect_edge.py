"""The edge side of a detector: the edge pyfunc returns decoded boxes, the device health check
compares golden detections by IoU and score."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edgeslim.components.reference.detector import DigitsDetector, default_heads, make_detection_splits
from edgeslim.components.common.tasks import task_from_dict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    data = make_detection_splits(seed=0, n_train=8, n_val=4, n_test=4)
    torch.manual_seed(0)
    model = DigitsDetector(width=8, head_hidden=8).eval()
    with torch.no_grad():  # an untrained head scores ~0.01 everywhere: give some cells confident scores
        model.head[0].cls[1].bias.fill_(0.5)
    path = export(model, OnnxExportConfig(), data=data, out_path=tmp_path_factory.mktemp("det") / "det.onnx").model
    task = task_from_dict({"kind": "detection", "num_classes": 10, "decoder": {
        "heads": default_heads(), "max_detections": 5}})
    return path, data, task


def test_the_edge_pyfunc_of_a_detector_returns_decoded_detections(exported, tmp_path):
    from edgeslim.components.tasks.detection.evaluate import onnx_detections
    from edgeslim.plugins import edge_flavor

    path, data, task = exported
    edge_flavor.save_model(tmp_path / "m", path, metadata={"task": task.to_dict()})
    out = edge_flavor.EdgeModel(tmp_path / "m").predict(data.x_test[:2])
    assert out["backend"].startswith("onnxruntime")
    assert len(out["detections"]) == 2 and out["detections"][0].shape[1] == 6
    want, _, _ = onnx_detections(path, data.x_test[:2], task)
    np.testing.assert_allclose(out["detections"][0], want[0], rtol=1e-5, atol=1e-5)
    plain = tmp_path / "plain"
    edge_flavor.save_model(plain, path, metadata={"task": "classification"})
    assert "detections" not in edge_flavor.EdgeModel(plain).predict(data.x_test[:2])


def test_health_check_compares_golden_detections_by_iou_and_score(exported, tmp_path):
    from edgeslim.components.tasks.detection.evaluate import onnx_detections
    from edgeslim.deploy.agent.health import run_health_check
    from edgeslim.deploy.manifest import encode_array

    path, data, task = exported
    release = tmp_path / "release"
    release.mkdir()
    shutil.copyfile(path, release / "model.onnx")
    x = np.ascontiguousarray(data.x_test[:2])
    golden, _, _ = onnx_detections(path, x, task)
    assert len(golden[0]) > 0
    check = {"input": encode_array(x), "outputs": {}, "task": task.to_dict(), "iou": 0.9, "score_tol": 0.02,
             "detections": [encode_array(g) for g in golden], "repeats": 1}
    ok = run_health_check(release, check)
    assert ok["ok"], ok["error"]
    shifted = [g.copy() for g in golden]
    shifted[1][:, :4] += 4.0
    bad = run_health_check(release, {**check, "detections": [encode_array(g) for g in shifted]})
    assert not bad["ok"] and "golden image 1: detections differ" in bad["error"] and "not found" in bad["error"]
    scored = [g.copy() for g in golden]
    scored[0][:, 4] += 0.1
    bad = run_health_check(release, {**check, "detections": [encode_array(g) for g in scored]})
    assert not bad["ok"] and "score differs" in bad["error"]


def test_the_controllers_check_of_a_detector_carries_golden_detections_from_its_input_example(exported, tmp_path):
    from edgeslim.components.tasks.detection.evaluate import onnx_detections
    from edgeslim.deploy.controller import WaveRolloutConfig, golden_check
    from edgeslim.deploy.agent.health import run_health_check
    from edgeslim.deploy.manifest import decode_array
    from edgeslim.plugins import edge_flavor

    path, data, task = exported
    x = np.ascontiguousarray(data.x_test[:2])
    model_dir = tmp_path / "m"
    edge_flavor.save_model(model_dir, path, metadata={"task": task.to_dict()}, input_example=x)
    check = golden_check(model_dir, WaveRolloutConfig.from_strings({"iou": "0.8", "score_tol": "0.03"}))
    assert "input example" in check["source"]
    np.testing.assert_array_equal(decode_array(check["input"]), x)  # real images, not noise
    want, _, _ = onnx_detections(path, x, task)
    assert len(check["detections"]) == 2 and len(want[0]) > 0
    np.testing.assert_allclose(decode_array(check["detections"][0]), want[0], rtol=1e-5, atol=1e-5)
    assert (check["iou"], check["score_tol"], check["task"]["kind"]) == (0.8, 0.03, "detection")

    release = tmp_path / "release"
    release.mkdir()
    shutil.copyfile(path, release / "model.onnx")
    assert run_health_check(release, check)["ok"]
    # another detector (other weights) on the device fails the same check, by its boxes
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    torch.manual_seed(1)
    other = DigitsDetector(width=8, head_hidden=8).eval()
    with torch.no_grad():
        other.head[0].cls[1].bias.fill_(0.5)
    export(other, OnnxExportConfig(), data=data, out_path=release / "model.onnx")
    bad = run_health_check(release, check)
    assert not bad["ok"] and "detections differ" in bad["error"]


def test_detection_tolerances_out_of_range_are_refused():
    from edgeslim.components.common.errors import ConfigError
    from edgeslim.deploy.controller import WaveRolloutConfig

    with pytest.raises(ConfigError, match="iou: got 1.5"):
        WaveRolloutConfig.from_strings({"iou": "1.5"})
    with pytest.raises(ConfigError, match="score_tol: got -0.1"):
        WaveRolloutConfig.from_strings({"score_tol": "-0.1"})
