"""The segmentation task's parts without servers: masks as RLE and back, masks mapped through the
preprocessing's geometry both ways, the ``masks`` provider, mIoU from a confusion matrix, the gate, the
device check, ``--task auto``'s recognition and the pixel-wise loss."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.data import Splits, load_data
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.image_preprocess import ImagePreprocessConfig
from edgeslim.components.common.tasks import TASKS, task_class, task_from_dict

TASK = task_from_dict({"kind": "segmentation", "num_classes": 3})


def seg():
    from edgeslim.components.tasks.segmentation import runtime

    return runtime


def test_rle_is_cocos_column_major_run_lengths_and_round_trips():
    rt = seg()
    m = np.array([[0, 1, 1], [0, 1, 0]], bool)
    # column-major pixels: 0 0 | 1 1 | 1 0 -> runs of 0s and 1s, starting with zeros
    assert rt.rle_encode(m) == {"size": [2, 3], "counts": [2, 3, 1]}
    assert rt.rle_encode(~m)["counts"] == [0, 2, 3, 1]  # the first pixel set: an empty run of zeros first
    rng = np.random.default_rng(0)
    for _ in range(5):
        classes = rng.integers(0, 4, (7, 9)).astype(np.int32)
        assert np.array_equal(rt.decode_masks(rt.encode_masks(classes)), classes)
    with pytest.raises(ValueError, match="sum to"):
        rt.rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_masks_follow_the_letterbox_into_the_input_and_back_to_the_source():
    from PIL import Image

    from edgeslim.components.tasks.segmentation.data import preprocess_mask

    rt = seg()
    src = np.kron(np.random.default_rng(1).integers(0, 3, (16, 32)), np.ones((2, 2), np.int64)).astype(np.uint8)
    cfg = ImagePreprocessConfig(letterbox=32)  # 64 x 32 source -> 32 x 16 pasted 8 rows down
    inp = preprocess_mask(Image.fromarray(src), cfg, pad_label=255)
    assert inp.shape == (32, 32)
    assert (inp[:8] == 255).all() and (inp[24:] == 255).all()  # the letterbox's padding counts for no class
    assert np.array_equal(inp[8:24], src[::2, ::2])
    back = rt.mask_to_source(inp, cfg.geometry(64, 32))
    assert back.shape == (32, 64) and np.array_equal(back, src)


def test_the_masks_provider_streams_images_and_masks_through_the_preprocessing(tmp_path):
    from edgeslim.components.tasks.segmentation.reference import write_mask_folders

    root = write_mask_folders(tmp_path / "d", {"train": 4, "val": 2, "test": 2}, size=40)
    d = load_data("masks", {"root": str(root), "workers": 2}, {"resize": [20, 20]})
    assert d.x_train.shape == (4, 3, 20, 20) and d.y_train.shape == (4, 20, 20)
    y = d.y_test[:2]
    assert y.dtype == np.int32 and set(np.unique(y)) <= {0, 1, 2, 3}
    assert task_class("segmentation").recognises(d)
    assert not any(task_class(k).recognises(d) for k in TASKS.names() if k != "segmentation")
    assert d.digest() == load_data("masks", {"root": str(root)}, {"resize": [20, 20]}).digest()

    (root / "test" / "masks" / "0001.png").unlink()
    with pytest.raises(DataError, match=r"0001\.png: no mask .*0001\.png; add the image's class-map PNG"):
        load_data("masks", {"root": str(root)})
    from PIL import Image

    Image.new("RGB", (40, 40)).save(root / "test" / "masks" / "0001.png")
    bad = load_data("masks", {"root": str(root)})
    with pytest.raises(DataError, match="a RGB image; a mask is a single-channel PNG of class ids"):
        bad.y_test[:2]


def test_miou_pixel_accuracy_and_the_worst_class_come_from_the_confusion_matrix():
    from edgeslim.components.tasks.segmentation.evaluate import confusion, segmentation_metrics

    gt = np.array([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = np.array([[[0, 1, 1, 1], [2, 0, 0, 2]]])
    m = segmentation_metrics(confusion(pred, gt, 3, 255))
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 1, union 2 (ignored pixels count for nothing)
    assert m["per_class_iou"] == {"0": 33.333, "1": 66.667, "2": 50.0}
    assert m["miou"] == pytest.approx(50.0) and m["pixel_accuracy"] == pytest.approx(66.6667, abs=1e-3)
    assert m["worst_class"] == "0" and m["pixels"] == 6
    with pytest.raises(DataError, match="holds class 7, outside 0..2"):
        confusion(pred, np.full_like(gt, 7), 3, 255)


def test_the_gate_floors_the_worst_class_while_the_mean_holds():
    from edgeslim.components.tasks.segmentation.evaluate import gate_segmentation

    s = {"miou": 80.0, "pixel_accuracy": 95.0, "per_class_iou": {"0": 95.0, "1": 80.0, "2": 65.0},
         "worst_class": "2", "worst_class_iou": 65.0}
    c = {**s, "miou": 79.5, "per_class_iou": {"0": 95.0, "1": 81.0, "2": 40.0}, "worst_class_iou": 40.0}
    gate = task_from_dict({"kind": "segmentation", "num_classes": 3, "gate": {"min_class_iou": 50.0}}).gate
    v = gate_segmentation({"source": {"segmentation": s}, "candidate": {"segmentation": c}}, gate)
    assert not v["passed"] and [ch["name"] for ch in v["checks"] if not ch["passed"]] == ["min_class_iou"]
    assert "worst class 2 has IoU 40.00 (fp32 65.00); required 50.00" in v["summary"]


def test_the_task_section_refuses_what_cannot_be_judged():
    with pytest.raises(ConfigError, match="task.num_classes: got 1"):
        task_from_dict({"kind": "segmentation", "num_classes": 1})
    with pytest.raises(ConfigError, match="task.ignore_index: got 2, which is class 2 of 3"):
        task_from_dict({"kind": "segmentation", "num_classes": 3, "ignore_index": 2})
    with pytest.raises(ConfigError, match="task.gate.max_miou_dorp: unknown key; did you mean .max_miou_drop."):
        task_from_dict({"kind": "segmentation", "num_classes": 3, "gate": {"max_miou_dorp": 1}})


def test_the_runtime_reads_the_logits_and_the_device_check_compares_masks_by_iou():
    from types import SimpleNamespace

    rt = seg()
    logits = np.zeros((2, 3, 8, 8), np.float32)
    logits[:, 1, :4] = 5.0
    logits[1, 2, 6:, 6:] = 9.0
    run = task_class("segmentation").runtime(TASK)
    pred = run.predict({"output": logits, "backend": "onnxruntime:CPU"})
    assert [[m["class"] for m in img] for img in pred["masks"]] == [[0, 1], [0, 1, 2]]
    check = run.golden({"output": logits}, SimpleNamespace(iou=0.9))
    assert run.compare(check, {"output": logits}) == (None, 0.0)
    moved = logits.copy()
    moved[1, 2] = 0.0
    moved[1, 2, 4:, 4:] = 9.0  # class 2 grows from 4 to 16 pixels: IoU 0.25
    reason, worst = run.compare(check, {"output": moved})
    assert reason == "golden image 1: class 2's mask differs (IoU 0.250 < 0.9)" and worst == pytest.approx(0.75)
    with pytest.raises(ConfigError, match=r"output 'output' has shape \[2, 3, 8\]; a segmenter gives per-pixel"):
        run.predict({"output": logits[:, :, 0]})


def test_the_pixel_loss_ignores_unlabelled_pixels_and_matches_the_teacher():
    import torch

    from edgeslim.components.tasks.segmentation.train import pixel_loss

    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    ignored = y.clone()
    ignored[:, :2] = 255
    ce = pixel_loss(TASK, temperature=2.0, alpha=0.0)
    assert float(ce(s, None, ignored)) == pytest.approx(float(torch.nn.functional.cross_entropy(s[:, :, 2:],
                                                                                               y[:, 2:])), rel=1e-5)
    kd = pixel_loss(TASK, temperature=2.0, alpha=1.0)
    assert float(kd(s, s, y)) == pytest.approx(0.0, abs=1e-6) and float(kd(s, -s, y)) > 0.1


def test_a_splits_of_class_maps_is_told_apart_from_labels_and_boxes():
    x = np.zeros((3, 3, 4, 4), np.float32)
    d = Splits(x, np.zeros((3, 4, 4), np.int64), x, np.zeros((3, 4, 4), np.int64), x, np.zeros((3, 4, 4), np.int64))
    assert [k for k in TASKS.names() if task_class(k).recognises(d)] == ["segmentation"]


# ----------------------------------------------------------------------------------------- yolo-seg

INSTANCE = task_from_dict({"kind": "segmentation", "format": "yolo-seg", "num_classes": 2,
                           "decoder": {"nms_iou": 0.5, "min_score": 0.05}})


def yolo_seg_outputs() -> dict[str, np.ndarray]:
    """One 32x32 image: two anchors on one 8x8 box (class 1, scores 0.9 and 0.8: NMS keeps one), one anchor on a
    12x12 box (class 0, 0.6), the rest scoring 0.01; prototype 0 positive everywhere, so a mask is its box."""
    a, nm = 6, 2
    det = np.zeros((1, 4 + 2 + nm, a), np.float32)
    det[0, 4:6] = 0.01
    for j, (cx, cy, w, h, cls, score) in enumerate([(8, 8, 8, 8, 1, 0.9), (8.5, 8, 8, 8, 1, 0.8),
                                                     (22, 22, 12, 12, 0, 0.6)]):
        det[0, :4, j] = cx, cy, w, h
        det[0, 4 + cls, j] = score
        det[0, 6, j] = 1.0  # the coefficient of prototype 0
    proto = np.zeros((1, nm, 8, 8), np.float32)
    proto[0, 0] = 10.0
    return {"output_0": det, "output_1": proto}


def test_the_yolo_seg_decoder_keeps_the_best_of_overlaps_and_crops_each_mask_to_its_box():
    from edgeslim.components.tasks.segmentation.instance import decode_instances

    (img,) = decode_instances(yolo_seg_outputs(), INSTANCE, (32, 32))
    dets, masks = img["detections"], img["masks"]
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.6]) and dets[:, 5].tolist() == [1, 0]
    assert dets[0, :4].tolist() == pytest.approx([4, 4, 12, 12])
    assert masks.shape == (2, 32, 32) and masks[0].sum() == 64 and masks[0, 4:12, 4:12].all()
    assert masks[1].sum() == 144 and masks[1, 16:28, 16:28].all()
    with pytest.raises(ConfigError, match=r"do not fit num_classes=3: the decoded output needs 4 box values \+ 3"):
        decode_instances(yolo_seg_outputs(), task_from_dict({"kind": "segmentation", "format": "yolo-seg",
                                                             "num_classes": 3}))


def test_box_and_mask_map_match_by_their_own_iou():
    from edgeslim.components.tasks.segmentation.instance import decode_instances, instance_labels
    from edgeslim.components.tasks.segmentation.instance_eval import instance_metrics, record

    (img,) = decode_instances(yolo_seg_outputs(), INSTANCE, (32, 32))
    exact = instance_labels([1, 0], img["masks"])
    m = instance_metrics([record(img, exact)], 2, 0.25)
    assert m["mask_map50_95"] == m["box_map50_95"] == 100.0 and m["mean_tp_score"] == pytest.approx(0.75)
    # the same boxes, but the class-1 object is a thin bar inside its box: the box still matches, the mask not
    bar = img["masks"].copy()
    bar[0] = False
    bar[0, 4:12, 4:6] = True
    bar[0, 4, 4:12] = True
    m = instance_metrics([record(img, instance_labels([1, 0], bar))], 2, 0.25)
    assert m["box_map50"] == 100.0 and m["per_class_mask_ap50"] == {"0": 100.0, "1": 0.0}
    assert m["recall"] == 50.0 and m["instances"] == 2


def test_the_yolo_seg_runtime_returns_instances_and_the_device_check_matches_them():
    from types import SimpleNamespace

    run = task_class("segmentation").runtime(INSTANCE)
    outs = yolo_seg_outputs()
    (img,) = run.predict(outs)["masks"]
    assert [(i["class"], i["score"], i["box"]) for i in img] == [(1, 0.9, [4.0, 4.0, 12.0, 12.0]),
                                                                  (0, 0.6, [16.0, 16.0, 28.0, 28.0])]
    check = run.golden(outs, SimpleNamespace(iou=0.9, score_tol=0.05))
    assert run.compare(check, outs) == (None, 0.0)
    low = {k: v.copy() for k, v in outs.items()}
    low["output_0"][0, 5, :2] = 0.7, 0.6  # the class-1 object's best score falls by 0.2
    reason, worst = run.compare(check, low)
    assert reason == "golden image 0: golden instance 0 (class 1): score differs by 0.200 (> 0.05)"
    assert worst == pytest.approx(0.2)


def test_init_recognises_a_yolo_seg_model_and_its_instance_labels():
    import torch
    import yaml

    from edgeslim.components.common.model_outputs import tensor_outputs
    from edgeslim.components.tasks.segmentation.instance import instance_labels

    class FakeSeg(torch.nn.Module):  # what Ultralytics' SegmentationModel returns in eval mode
        def forward(self, x):
            n = len(x)
            return (torch.zeros(n, 4 + 2 + 32, 21), torch.zeros(n, 32, 8, 8)), {"feats": [x]}

    x = np.zeros((4, 3, 32, 32), np.float32)
    labels = np.empty(4, dtype=object)
    labels[:] = [instance_labels([1], np.ones((1, 32, 32), bool))] * 4
    d = Splits(x, labels, x, labels, x, labels)
    cls = task_class("segmentation")
    assert [k for k in TASKS.names() if task_class(k).recognises(d)] == ["segmentation"]
    assert [list(t.shape) for t in tensor_outputs(FakeSeg()(torch.from_numpy(x)))] == [[4, 38, 21], [4, 32, 8, 8]]
    text = cls.init_recipe(source="models:/s@champion", output="r.yaml", data="  provider: npz", edge_name="s-edge",
                           splits=d, load_model=FakeSeg)
    task = yaml.safe_load(text)["task"]
    assert task["format"] == "yolo-seg" and task["num_classes"] == 2
    assert task["decoder"]["output"] == "output_0" and task["decoder"]["proto"] == "output_1"


@pytest.mark.slow
def test_ultralytics_segmentation_loss_trains_on_instance_labels():
    import os

    import torch

    os.environ.setdefault("YOLO_OFFLINE", "1")
    ultralytics = pytest.importorskip("ultralytics.nn.tasks")
    from edgeslim.components.tasks.segmentation.reference import as_inputs, instance_scenes
    from edgeslim.components.tasks.segmentation.train_instance import _padded, label_loss, output_matching
    from edgeslim.components.transform.yolo import training_outputs

    torch.manual_seed(0)
    model = ultralytics.SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)
    images, labels = instance_scenes(2, 64, seed=0)
    loss_fn, name = label_loss(model, task_from_dict({"kind": "segmentation", "format": "yolo-seg", "num_classes": 3}))
    assert name == "ultralytics v8SegmentationLoss"
    model.train()
    with training_outputs(model):
        out = model(torch.from_numpy(as_inputs(images)))
        loss = loss_fn(out, _padded(labels), model)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
        assert float(output_matching(out, out).detach()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["lraspp", "yolov8n-seg-trained"])
def test_the_segmentation_benches_train_then_report_fp32_ptq_and_the_search(workload, tmp_path, capsys):
    """`edgeslim bench --workload lraspp|yolov8n-seg-trained --quick`: a model trained a step or two on shape
    scenes, then fp32, PTQ and `quantize: auto` scored on the test split; the search's row says what it cost."""
    import json

    from edgeslim.cli import main

    pytest.importorskip("ultralytics" if workload.startswith("yolo") else "torchvision")
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", workload, "--quick", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["fp32", "PTQ minmax", "quantize: auto"]
    metric = "miou" if workload == "lraspp" else "mask_map50_95"
    for r in (rows["fp32"], rows["PTQ minmax"]):
        assert 0.0 <= r[metric] <= 100.0
    auto = rows["quantize: auto"]
    assert auto["search_s"] > 0 and auto["trials"] >= 1 and (auto.get("failed") or metric in auto)
    assert "trained here" in capsys.readouterr().out
