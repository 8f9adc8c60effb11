"""The segmentation task end to end, against a real `mlflow server`: a segmenter from a module outside the
repository (logged with ``code_paths``), shape scenes written as the ``masks`` provider reads them, then
``edgeslim init`` (which recognises the class maps), ``edgeslim run`` (pixel-wise distillation, the
accuracy-aware search, the segmentation gate and report), the registered edge model through
``mlflow.pyfunc`` with raw images (masks as RLE in the source image's pixels) and the device's health
check against the release's golden masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli
from tests.task_e2e import (check_registered, device_health, download_edge_model, edge_task, golden_check,
                            passed_report, python, register_user_model, run_recipe, write_quick_recipe)

pytestmark = pytest.mark.slow

SOURCE = "models:/shape-segmenter@champion"
MODULE = "shape_segmenters"
# A user's model code: the pipeline gets it only from what was logged with the model (code_paths).
MODEL_CODE = '''
import torch
from torch import nn


def block(cin, cout, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ShapeSegmenter(nn.Module):
    """A small encoder-decoder: per-pixel logits (N, classes, H, W) at the input's size."""

    def __init__(self, classes=4, width=12):
        super().__init__()
        w = width
        self.enc1 = block(3, w)
        self.enc2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w))
        self.enc3 = nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w, dilation=2))
        self.fuse = block(6 * w, 2 * w)
        self.classifier = nn.Conv2d(3 * w, classes, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(a)
        c = nn.functional.interpolate(self.enc3(b), size=b.shape[-2:], mode="bilinear", align_corners=False)
        u = nn.functional.interpolate(self.fuse(torch.cat([b, c], 1)), size=a.shape[-2:], mode="bilinear",
                                      align_corners=False)
        return self.classifier(torch.cat([a, u], 1))
'''
SIZE = 48  # the model's input; the source images are 64 px (data.preprocess resizes images and masks)
GATE = {"max_miou_drop": 2.0, "min_class_iou": 20.0, "max_pixel_accuracy_drop": 2.0}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from edgeslim.components.tasks.segmentation.reference import write_mask_folders

    return write_mask_folders(tmp_path_factory.mktemp("shape-masks"), {"train": 160, "val": 32, "test": 32}, size=64)


@pytest.fixture(scope="module")
def registered_segmenter(mlflow_server, data_root, tmp_path_factory) -> str:
    """``ShapeSegmenter`` trained for a few epochs on the train split, logged with its module as code_paths."""
    import torch

    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.tasks.segmentation.train import train_segmenter

    def trained(module):
        data = load_data("masks", {"root": str(data_root)}, {"resize": [SIZE, SIZE]})
        torch.manual_seed(0)
        task = task_from_dict({"kind": "segmentation", "num_classes": 4})
        return train_segmenter(module.ShapeSegmenter(), data, task, epochs=6, lr=5e-3, batch_size=16).eval()

    register_user_model(mlflow_server.uri, "tests-segmentation", "shape-segmenter",
                        tmp_path_factory.mktemp("user-code"), MODULE, MODEL_CODE, trained)
    return SOURCE


@pytest.fixture(scope="module")
def recipe(registered_segmenter, data_root, mlflow_server, tmp_path_factory) -> Path:
    """What ``edgeslim init`` writes for the segmenter (it tells the class maps apart by itself), with the
    test's sizes: the images resized to 48 px, a short distillation, one calibrator, a quick evaluation."""
    out = tmp_path_factory.mktemp("seg-recipe") / "recipe.yaml"
    proc = run_cli("init", "--source", SOURCE, "--data", "masks", "--data-arg", f"root={data_root}", "-o", str(out),
                   "--tracking-uri", mlflow_server.uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = yaml.safe_load(out.read_text())
    assert doc["task"]["kind"] == "segmentation" and doc["task"]["num_classes"] == 4
    assert doc["task"]["output"] == "output" and doc["data"]["provider"] == "masks"
    doc["data"]["preprocess"] = {"resize": [SIZE, SIZE]}
    quantize = {**doc["stages"][-1]["quantize"], "calibrators": ["percentile"], "num_samples": 64}
    doc["stages"] = [doc["stages"][0],
                     {"distill": {"method": "logit", "student": "previous", "epochs": 1, "batch_size": 16,
                                  "lr": 1e-3, "alpha": 0.7}},
                     {"quantize": quantize}]
    doc["task"]["gate"] = GATE
    return write_quick_recipe(doc, out, "tests-segmentation")


@pytest.fixture(scope="module")
def run(recipe, mlflow_server, tmp_path_factory):
    return run_recipe(recipe, mlflow_server.uri, tmp_path_factory.mktemp("seg-run"))


def test_run_distills_searches_gates_registers_and_reports_the_segmenter(run, mlflow_server):
    rep, (proc, out) = passed_report(run), run
    assert [c["name"] for c in rep["gate"]["checks"]] == ["miou_drop", "min_class_iou", "pixel_accuracy_drop"]
    assert rep["metric_name"] == "miou" and rep["test_samples"] == 32
    s, c = rep["source"]["segmentation"], rep["candidate"]["segmentation"]
    assert set(s["per_class_iou"]) == {"0", "1", "2", "3"} and s["miou"] > 50.0
    assert s["miou"] - c["miou"] <= GATE["max_miou_drop"] and c["worst_class_iou"] >= GATE["min_class_iou"]
    q = rep["candidate"]["quantization"]
    assert q["chosen_on"] == "val" and q["winner"]["passed"] is True
    assert {"miou", "worst_class_iou", "pixel_accuracy", "sqnr_db"} <= set(q["trials"][0])
    # The per-class rows in the summary table, the overlays and the per-class chart in the page
    assert "pixel accuracy (%)" in proc.stdout and "IoU class 3 (%)" in proc.stdout
    html = (out / "report.html").read_text()
    for key in ("segmentation-iou", "segmentation-overlay"):
        assert f'id="chart-{key}"' in html and "<svg" in html.split(f'id="chart-{key}"')[1][:200]
    assert html.split('id="chart-segmentation-overlay"')[1].count("data:image/png;base64,") == 12
    assert len(rep["figures"]["overlays"]) == 3
    check_registered(mlflow_server.uri, "shape-segmenter", rep)


@pytest.fixture(scope="module")
def edge_model_dir(run, mlflow_server, tmp_path_factory) -> Path:
    return download_edge_model("shape-segmenter", run, mlflow_server.uri, tmp_path_factory.mktemp("edge-model"))


def test_the_edge_pyfunc_returns_masks_in_the_source_images_pixels(edge_model_dir, data_root, mlflow_server):
    task = edge_task(edge_model_dir)
    assert task["kind"] == "segmentation" and task["num_classes"] == 4
    # Both through mlflow.pyfunc, as registered by `edgeslim run`: input tensors (masks at the 48 px
    # input) and raw images (masks in the 64 px source images' pixels).
    proc = python(f"""
        import json, mlflow, numpy as np
        from pathlib import Path
        root = Path({str(data_root)!r}) / "test"
        uri = "models:/shape-segmenter-edge@edge-candidate"
        x = np.random.default_rng(0).random((2, 3, {SIZE}, {SIZE}), dtype=np.float32)
        model = mlflow.pyfunc.load_model(uri)
        tensors = model.predict(x)
        images = [(root / "images" / f"{{i:04d}}.png").read_bytes() for i in range(3)]
        out = model.predict({{"images": images}})
        print(json.dumps({{"keys": sorted(out), "masks": out["masks"], "tensor_keys": sorted(tensors),
                           "tensor_sizes": [m["size"] for img in tensors["masks"] for m in img]}}))
    """, {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["keys"]) == set(got["tensor_keys"]) == {"backend", "output", "masks"}
    assert got["tensor_sizes"] and all(s == [SIZE, SIZE] for s in got["tensor_sizes"])
    from PIL import Image

    from edgeslim.components.tasks.segmentation.runtime import class_ious, decode_masks

    for i, encoded in enumerate(got["masks"]):
        assert all(m["size"] == [64, 64] for m in encoded)  # the source image's pixels, not the 48 px input
        truth = np.asarray(Image.open(data_root / "test" / "masks" / f"{i:04d}.png"), np.int32)
        ious = class_ious(truth, decode_masks(encoded))
        assert ious[0] > 0.9 and np.mean(list(ious.values())) > 0.5, ious


def test_the_device_health_check_compares_the_golden_masks(edge_model_dir):
    check = golden_check(edge_model_dir)
    assert check["task"]["kind"] == "segmentation" and len(check["masks"]) == 2 and check["iou"] == 0.9
    ok = device_health(edge_model_dir, check)
    assert ok["ok"] is True and ok["error"] is None, ok
    # A device whose masks are not the golden ones fails with the class and its IoU named.
    from edgeslim.components.tasks.segmentation.runtime import decode_masks, encode_masks

    golden = decode_masks(check["masks"][0])
    shifted = np.roll(golden, 6, axis=1)
    bad = {**check, "masks": [encode_masks(shifted), *check["masks"][1:]]}
    failed = device_health(edge_model_dir, bad)
    assert failed["ok"] is False and "golden image 0: class" in failed["error"] and "IoU" in failed["error"], failed
