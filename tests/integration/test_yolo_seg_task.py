"""The ``yolo-seg`` instance task end to end, against a real `mlflow server`: a tiny Ultralytics segmentation
model from a module outside the repository (a ``SegmentationModel`` subclass built from YOLOv8-seg's yaml at an
eighth of the n width, logged with ``code_paths``), rectangles labelled as an Ultralytics segmentation dataset
(polygon lines) read by the ``yolo`` provider with ``masks: true``, then ``edgeslim init`` (which recognises
the instance labels and the model's decoded output and prototypes), ``edgeslim run`` (export, ``quantize:
auto``, the instance gate), the registered edge model through ``mlflow.pyfunc`` with raw images (instances as
RLE in the source image's pixels) and the device's health check against the release's golden instances.

The model is untrained (nothing is downloaded, and training a detector from scratch costs minutes): its class
biases are set so that every anchor scores about 0.5, so it reports instances for the pyfunc and the golden
check to carry. Accuracy is the unit tests' and the benches' business; this checks the parts fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli
from tests.task_e2e import (check_registered, device_health, download_edge_model, edge_task, golden_check,
                            passed_report, python, register_user_model, run_recipe, write_quick_recipe)
from tests.image_datasets import DET_SIZE, write_segmentation

pytestmark = pytest.mark.slow

SOURCE = "models:/tiny-yolo-seg@champion"
MODULE = "tiny_yolo_segs"
MODEL_CODE = '''
import copy

import torch
from ultralytics.nn.tasks import SegmentationModel, yaml_model_load


class TinyYoloSeg(SegmentationModel):
    """YOLOv8-seg's layout at an eighth of the n width; every anchor's class scores start near 0.5."""

    def __init__(self, nc=3):
        cfg = copy.deepcopy(yaml_model_load("yolov8n-seg.yaml"))
        cfg["scales"] = {"n": [0.33, 0.125, 1024]}
        super().__init__(cfg, nc=nc, verbose=False)
        with torch.no_grad():
            for branch in self.model[-1].cv3:
                branch[-1].bias.zero_()
'''
SIZE = 64  # the model's input: the 40x30 sources letterboxed (scale 1.6, 8 rows of padding top and bottom)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("yolo-seg-data")
    write_segmentation(root, counts=(16, 8, 8))
    return root


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory) -> str:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    register_user_model(mlflow_server.uri, "tests-yolo-seg", "tiny-yolo-seg", tmp_path_factory.mktemp("user-code"),
                        MODULE, MODEL_CODE, lambda module: module.TinyYoloSeg().eval())
    return SOURCE


@pytest.fixture(scope="module")
def recipe(registered, data_root, mlflow_server, tmp_path_factory) -> Path:
    """What ``edgeslim init`` writes for the yolo provider with polygon labels, at the test's sizes."""
    out = tmp_path_factory.mktemp("yolo-seg-recipe") / "recipe.yaml"
    proc = run_cli("init", "--source", SOURCE, "--data", "yolo", "--data-arg", f"path={data_root / 'data.yaml'}",
                   "--data-arg", "masks=true", "-o", str(out), "--tracking-uri", mlflow_server.uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = yaml.safe_load(out.read_text())
    assert doc["task"]["format"] == "yolo-seg" and doc["task"]["num_classes"] == 3
    assert doc["data"]["provider"] == "yolo" and doc["data"]["args"]["masks"] is True
    doc["data"]["preprocess"] = {**doc["data"]["preprocess"], "letterbox": SIZE}
    doc["stages"][-1]["quantize"].update(calibrators=["percentile"], num_samples=16)
    return write_quick_recipe(doc, out, "tests-yolo-seg")


@pytest.fixture(scope="module")
def run(recipe, mlflow_server, tmp_path_factory):
    return run_recipe(recipe, mlflow_server.uri, tmp_path_factory.mktemp("yolo-seg-run"))


def test_run_quantizes_gates_and_registers_the_instance_segmenter(run, data_root, mlflow_server):
    rep, (proc, out) = passed_report(run), run
    check_registered(mlflow_server.uri, "tiny-yolo-seg", rep)
    assert rep["metric_name"] == "mask_map50_95" and rep["test_samples"] == 8
    s, c = rep["source"]["instance_segmentation"], rep["candidate"]["instance_segmentation"]
    # the test split's polygons reached the evaluator as instances, one per labelled object
    labelled = sum(len(p.read_text().splitlines()) for p in (data_root / "labels" / "test").glob("*.txt"))
    assert labelled and s["instances"] == c["instances"] == labelled
    assert [k["name"] for k in rep["gate"]["checks"]] == ["mask_map50_drop", "mask_map50_95_drop",
                                                          "mean_tp_score_drop"]
    # the instance rows in the summary table and the per-class mask AP chart in the page
    assert "mask mAP@0.5 (%)" in proc.stdout and "mean true-positive score" in proc.stdout
    html = (out / "report.html").read_text()
    assert f"Test split, {labelled} instances" in html


@pytest.fixture(scope="module")
def edge_model_dir(run, mlflow_server, tmp_path_factory) -> Path:
    return download_edge_model("tiny-yolo-seg", run, mlflow_server.uri, tmp_path_factory.mktemp("edge-model"))


def test_the_edge_pyfunc_returns_instances_in_the_source_images_pixels(edge_model_dir, data_root, mlflow_server):
    task = edge_task(edge_model_dir)
    assert task["kind"] == "segmentation" and task["format"] == "yolo-seg"
    proc = python(f"""
        import json, mlflow, numpy as np
        from pathlib import Path
        from edgeslim.plugins.edge_flavor import load_model
        root = Path({str(data_root)!r}) / "images" / "test"
        uri = "models:/tiny-yolo-seg-edge@edge-candidate"
        x = np.random.default_rng(0).random((2, 3, {SIZE}, {SIZE}), dtype=np.float32)
        tensors = mlflow.pyfunc.load_model(uri).predict(x)
        images = [p.read_bytes() for p in sorted(root.glob("*.png"))[:3]]
        out = load_model(uri).predict({{"images": images}})
        sizes = [m["size"] for img in tensors["masks"] for m in img]
        print(json.dumps({{"masks": out["masks"], "tensor_sizes": sizes}}))
    """, {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tensor_sizes"] and all(s == [SIZE, SIZE] for s in got["tensor_sizes"])
    from edgeslim.components.tasks.segmentation.runtime import rle_decode

    w, h = DET_SIZE
    assert len(got["masks"]) == 3 and all(got["masks"])
    for image in got["masks"]:
        for inst in image:
            assert inst["size"] == [h, w]  # the 40x30 source's pixels, not the 64 px input
            x1, y1, x2, y2 = inst["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            ys, xs = np.nonzero(rle_decode(inst))
            if len(xs):  # a mask stays inside its box (a pixel of rounding either side)
                assert xs.min() >= x1 - 1 and xs.max() <= x2 and ys.min() >= y1 - 1 and ys.max() <= y2


def test_the_device_health_check_compares_the_golden_instances(edge_model_dir):
    check = golden_check(edge_model_dir)
    assert check["task"]["format"] == "yolo-seg" and check["instances"] and any(check["instances"])
    ok = device_health(edge_model_dir, check)
    assert ok["ok"] is True and ok["error"] is None, ok
    # A device whose instance has lost its mask fails, naming the golden instance it misses.
    from edgeslim.components.tasks.segmentation.runtime import rle_decode, rle_encode

    n = next(i for i, insts in enumerate(check["instances"]) if insts)
    first = check["instances"][n][0]
    emptied = {**first, **rle_encode(np.zeros_like(rle_decode(first)))}
    bad = {**check, "instances": [*check["instances"][:n], [emptied, *check["instances"][n][1:]],
                                  *check["instances"][n + 1:]]}
    failed = device_health(edge_model_dir, bad)
    assert failed["ok"] is False and f"golden image {n}: golden instance 0" in failed["error"], failed
