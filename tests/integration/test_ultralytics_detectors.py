"""Ultralytics detectors as users register them (`mlflow.pytorch.log_model(YOLO(...).model, ...)`, pickle).

docs/quickstart.md's "Your YOLOv8" runs as written: its `log_yolo.py`, then `edgeslim init --data yolo` and
`edgeslim run`, on a YOLOv8n in `best.pt` and a dataset in Ultralytics' layout. For YOLO11n, `edgeslim init`
recognises the decoded (N, 4+nc, A) output, and export -> PTQ -> evaluate -> gate run on it step by step.
Random weights (no downloads here) give meaningless mAP: the tests hold the mechanics and the agreement of
fp32 ONNX and torch, not accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import register_champion, run_cli
from tests.doc_commands import run_bash
from tests.docs_blocks import doc_block

pytestmark = pytest.mark.slow
os.environ.setdefault("YOLO_OFFLINE", "1")
NC = 3
SIZE = 640


def _images(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Grey canvases with 1-3 filled rectangles each; labels (k, 5) [x1, y1, x2, y2, class] in pixels."""
    rng = np.random.default_rng(seed)
    x = np.full((n, 3, size, size), 0.45, np.float32)
    y = np.empty(n, object)
    for i in range(n):
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.integers(size // 16, size * 3 // 8, 2)  # 40-240 pixels at 640
            x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            c = int(rng.integers(0, NC))
            x[i, c, y1:y1 + h, x1:x1 + w] = 1.0
            boxes.append([x1, y1, x1 + w, y1 + h, c])
        y[i] = np.asarray(boxes, np.float32)
    return x, y


@pytest.fixture(scope="module")
def det_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("ultralytics") / "det.npz"
    arrays = {}
    for split, n, seed in (("train", 4, 0), ("val", 2, 1), ("test", 3, 2)):
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _images(n, seed)
    np.savez(path, **arrays)
    return path


def _register(uri: str, cfg: str) -> str:
    """A random-init Ultralytics DetectionModel registered as users do it; returns models:/NAME@champion."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=NC, verbose=False).eval()
    name = f"ul-{cfg.removesuffix('.yaml')}"
    return register_champion(uri, model, name, "tests-ultralytics")


def _weights(path) -> None:
    """What the reader brings as `best.pt`: a YOLOv8n with NC classes, saved as Ultralytics saves a checkpoint
    (random weights: nothing can be downloaded here)."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    yolo.model = DetectionModel("yolov8n.yaml", nc=NC, verbose=False)
    yolo.save(str(path))


def test_the_documented_yolov8_is_logged_initialised_and_compressed_as_written(mlflow_server, tmp_path):
    import json

    from edgeslim.components.recipe import load_recipe
    from tests.image_datasets import write_detection

    _weights(tmp_path / "best.pt")
    write_detection(tmp_path / "datasets" / "shapes")
    (tmp_path / "log_yolo.py").write_text(doc_block("docs/quickstart.md", "log-yolo"))
    # The timeout only stops a hang: YOLOv8n at 640 takes a few minutes on two busy cores.
    proc = run_bash(doc_block("docs/quickstart.md", "own-yolo"), cwd=tmp_path, timeout=3600,
                    env={"MLFLOW_TRACKING_URI": mlflow_server.uri, "YOLO_OFFLINE": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.stdout[-2000:], proc.stderr[-3000:])
    # init letterboxes to 640 as Ultralytics does, sees box labels, and reads the decoder off the model
    recipe = load_recipe(tmp_path / "yolo-recipe.yaml")
    assert recipe.data.provider == "yolo" and recipe.data.preprocess.letterbox == 640
    dec = recipe.task.decoder
    assert recipe.task.kind == "detection" and recipe.task.num_classes == NC
    assert (dec.format, dec.output, dec.strides, dec.scores) == ("yolo-decoded", "output", [8, 16, 32], "sigmoid")
    rep = json.loads((tmp_path / "edgeslim-run" / "report.json").read_text())
    assert rep["gate"]["passed"] is True, rep["gate"]
    assert rep["registered"]["name"] == "my-yolov8n-edge" and rep["registered"]["alias"] == "edge-candidate"
    assert rep["candidate"]["quantization"]["zero_points_all_zero"] is True


def test_yolo11n_is_recognised_exported_quantized_and_gated(mlflow_server, det_npz, tmp_path):
    import dataclasses

    import onnx

    from edgeslim.components.common.data import load_data
    from edgeslim.components.tasks.detection.runtime import box_iou
    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.export import export
    from edgeslim.components.pull import pull
    from edgeslim.components.quantize.ptq import check_qdq, quantize
    from edgeslim.components.recipe import EvaluateConfig, load_recipe
    from edgeslim.components.tasks.detection.evaluate import (evaluate_detection, gate_detection, onnx_detections,
                                                     torch_detections)

    source = _register(mlflow_server.uri, "yolo11n.yaml")
    recipe_path = tmp_path / "recipe.yaml"
    proc = run_cli("init", "--source", source, "--npz", str(det_npz), "--tracking-uri", mlflow_server.uri,
                   "-o", str(recipe_path), env={"YOLO_OFFLINE": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    recipe = load_recipe(recipe_path)
    dec = recipe.task.decoder
    assert recipe.task.kind == "detection" and recipe.task.num_classes == NC
    assert (dec.format, dec.output, dec.strides, dec.heads) == ("yolo-decoded", "output", [8, 16, 32], [])
    assert dec.scores == "sigmoid"  # Ultralytics applies the sigmoid in the graph

    data = load_data("npz", {"path": str(det_npz)})
    model = pull(source, tracking_uri=mlflow_server.uri, out_dir=tmp_path / "pulled").model
    fp32 = export(model, OnnxExportConfig(check_samples=3), data=data, out_path=tmp_path / "fp32.onnx").model
    outputs = onnx.load(str(fp32)).graph.output
    assert [o.name for o in outputs] == ["output"]
    dims = [d.dim_value or d.dim_param for d in outputs[0].type.tensor_type.shape.dim]
    assert dims[1:] == [4 + NC, 8400] and isinstance(dims[0], str)  # dynamic batch

    # Random-init scores sit near 0.003 (Ultralytics' class-bias prior): keep every candidate so that the
    # decoder has boxes to agree on.
    task = dataclasses.replace(recipe.task, decoder=dataclasses.replace(dec, min_score=0.0))
    onnx_dets, _, _ = onnx_detections(fp32, data.x_test, task, keep_outputs=False)
    torch_dets = torch_detections(model, data.x_test, task)
    for a, b in zip(onnx_dets, torch_dets):
        assert len(a) == len(b) == dec.max_detections
        same = (box_iou(a[:, :4], b[:, :4]) > 0.99) & (a[:, 5:6] == b[:, 5][None, :])
        assert same.any(axis=1).mean() >= 0.97
        np.testing.assert_allclose(np.sort(a[:, 4]), np.sort(b[:, 4]), atol=1e-4)

    ptq = PTQQuantizeConfig(calibrator="minmax", placement="weighted", num_samples=4)
    int8 = quantize(fp32, ptq, data=data, out_dir=tmp_path / "int8").model
    facts = check_qdq(int8)
    assert facts["qdq_nodes"] > 0 and facts["per_channel_weights"] > 0 and facts["zero_points_all_zero"]

    ev = evaluate_detection(int8, EvaluateConfig(latency_batches=[1], latency_warmup=1, latency_repeats=2),
                            parent_onnx=fp32, data=data, task=task)
    cand = ev.metrics["candidate"]
    assert {"map50", "map50_95", "mean_tp_score"} <= set(cand["detection"])
    assert 0.0 <= cand["fidelity"]["detection_agreement"] <= 1.0
    verdict = gate_detection(ev.metrics, task.gate)
    (loc,) = [c for c in verdict["checks"] if c["name"] == "map50_95_drop"]
    assert loc["threshold"] == 2.0
    drop = ev.metrics["source"]["detection"]["map50_95"] - cand["detection"]["map50_95"]
    assert loc["passed"] == (drop <= 2.0 + 1e-9)
    assert verdict["summary"].startswith(("passed", "failed", "box precision", "confidences"))
