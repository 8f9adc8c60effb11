"""Instance masks through the ``yolo`` and ``coco`` providers (``data.args.masks: true``): Ultralytics polygon
labels and COCO polygons / RLE (list and compressed counts) become per-image ``(k, H, W)`` instance stacks in
model-input pixels, which the yolo-seg evaluator reads; without ``masks`` the same files still give boxes."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.data import load_data
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.tasks.segmentation.instance import read_instances
from tests.image_datasets import rle_of, rle_string, write_segmentation

# 40x30 sources letterboxed to 80 wide x 64 high: an exact 2x scale and 2 rows of padding on top
LETTERBOX = {"letterbox": [64, 80]}


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return root, write_segmentation(root)


def _args(provider, root):
    return ({"path": str(root / "data.yaml")} if provider == "yolo" else {"root": str(root)})


def _expected(masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Source masks scaled 2x (nearest) and padded 2 rows on top and bottom, as class + 1 stacks."""
    up = masks.repeat(2, axis=1).repeat(2, axis=2)
    out = np.zeros((len(masks), 64, 80), np.uint8)
    out[:, 2:62] = up * (classes[:, None, None] + 1).astype(np.uint8)
    return out


@pytest.mark.parametrize("provider", ["yolo", "coco"])
def test_outlines_become_instance_stacks_placed_by_the_letterbox(seg, provider):
    root, truth = seg
    data = load_data(provider, {**_args(provider, root), "masks": True}, LETTERBOX)
    for split in ("train", "val", "test"):
        y = getattr(data, f"y_{split}")
        assert len(y) == len(truth[split]) == len(getattr(data, f"x_{split}"))
        got = y[:]  # every image: polygons, list RLE and compressed RLE alike
        for stack, (_, masks, classes) in zip(got, truth[split]):
            np.testing.assert_array_equal(stack, _expected(masks, classes))
    # what the yolo-seg evaluator reads from a stack: classes, masks and tight boxes in input pixels
    stack = data.y_train[0]
    cls, _, boxes = read_instances(stack)
    _, masks, classes = truth["train"][0]
    np.testing.assert_array_equal(cls, classes)
    ys, xs = np.nonzero(masks[0])
    np.testing.assert_array_equal(boxes[0], [2 * xs.min(), 2 * ys.min() + 2, 2 * xs.max() + 2, 2 * ys.max() + 4])
    # a batch by index array, and the digest is of the outlines (stable, no mask drawn twice the same way)
    assert [s.shape[0] for s in data.y_val[np.array([1, 0])]] == [len(truth["val"][1][1]), len(truth["val"][0][1])]
    again = load_data(provider, {**_args(provider, root), "masks": True}, LETTERBOX)
    assert again.digest() == data.digest()
    assert load_data(provider, {**_args(provider, root), "masks": True}, {"letterbox": 48}).digest() != data.digest()


@pytest.mark.parametrize("provider", ["yolo", "coco"])
def test_a_crop_cuts_masks_as_it_cuts_the_image(seg, provider):
    root, truth = seg
    data = load_data(provider, {**_args(provider, root), "masks": True}, {"resize": [30, 40], "center_crop": [20, 20]})
    for stack, (_, masks, _) in zip(data.y_test[:], truth["test"]):
        assert stack.shape == (len(masks), 20, 20)
        np.testing.assert_array_equal(stack > 0, masks[:, 5:25, 10:30])


def test_without_masks_the_same_files_give_boxes(seg):
    root, truth = seg
    for provider in ("yolo", "coco"):
        data = load_data(provider, _args(provider, root), LETTERBOX)
        assert np.asarray(data.y_train).dtype == object and len(data.y_train) == len(truth["train"])
        for lab, (_, masks, classes) in zip(data.y_train, truth["train"]):
            assert lab.shape == (len(masks), 5)
            np.testing.assert_array_equal(lab[:, 4], classes)


def test_compressed_rle_decodes_as_its_counts():
    from edgeslim.plugins.instance_labels import decode_rle, rle_counts

    rng = np.random.default_rng(3)
    m = rng.random((17, 23)) > 0.6
    counts = rle_of(m)
    np.testing.assert_array_equal(rle_counts(rle_string(counts), "x"), counts)
    np.testing.assert_array_equal(decode_rle(rle_counts(counts, "x"), 17, 23, "x"), m)


def test_mask_label_errors_are_one_line(seg, tmp_path):
    import json
    import shutil

    root, _ = seg
    d = tmp_path / "d"
    shutil.copytree(root, d)
    with pytest.raises(ConfigError, match="one input size"):
        load_data("yolo", {**_args("yolo", d), "masks": True}, {"resize": 32})
    with pytest.raises(ConfigError, match="masks: got 'yes'"):
        load_data("coco", {**_args("coco", d), "masks": "yes"}, LETTERBOX)
    (d / "labels" / "train" / "train_000.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"train_000.txt line 1: a box; data.args.masks: true needs"):
        load_data("yolo", {**_args("yolo", d), "masks": True}, LETTERBOX).read_labels()
    ann = d / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": [100]}
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"RLE size \[10, 10\] is not the image's"):
        load_data("coco", {**_args("coco", d), "masks": True}, LETTERBOX)
    del doc["annotations"][0]["segmentation"]
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="no segmentation"):
        load_data("coco", {**_args("coco", d), "masks": True}, LETTERBOX)
