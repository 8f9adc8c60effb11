"""Synthetic detection data, the npz provider's detection labels, and the recipe's task section."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.recipe import recipe_from_dict, recipe_from_json
from edgeslim.components.reference.detector import _digit_pools, make_detection_splits
from edgeslim.components.common.data import load_data


@pytest.fixture(scope="module")
def small():
    return make_detection_splits(seed=0, n_train=60, n_val=10, n_test=20)


def test_canvases_are_repeatable_and_boxes_sit_on_ink_inside_the_image(small):
    again = make_detection_splits(seed=0, n_train=60, n_val=10, n_test=20)
    assert small.digest() == again.digest()
    assert small.digest() != make_detection_splits(seed=1, n_train=60, n_val=10, n_test=20).digest()
    assert small.x_train.shape == (60, 1, 48, 48) and small.x_train.dtype == np.float32
    for x, labels in zip(small.x_test, small.y_test):
        assert 1 <= len(labels) <= 3 and labels.shape[1] == 5
        for x1, y1, x2, y2, c in labels:
            assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48 and 0 <= c <= 9
            inside = x[0, int(y1):int(y2), int(x1):int(x2)]
            assert inside.max() > 0.5  # the box holds the digit's ink


def test_test_canvases_use_held_out_digits():
    _, _, pools = _digit_pools(0)
    assert not set(pools["test"]) & (set(pools["train"]) | set(pools["val"]))


def _save_npz(path, y_bad=None):
    d = make_detection_splits(seed=0, n_train=8, n_val=4, n_test=4)
    arrays = {k: getattr(d, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    if y_bad is not None:
        arrays["y_val"] = y_bad
    np.savez(path, **arrays)
    return d


def test_npz_provider_reads_detection_labels(tmp_path):
    d = _save_npz(tmp_path / "det.npz")
    got = load_data("npz", {"path": str(tmp_path / "det.npz")})
    assert got.y_test.dtype == object and got.y_test[0].dtype == np.float32
    np.testing.assert_array_equal(got.y_test[1], d.y_test[1])


@pytest.mark.parametrize("box, words", [
    ([3, 2, 60, 10, 1], "outside the 48x48 image"),
    ([-1, 2, 10, 10, 1], "outside the 48x48 image"),
    ([10, 2, 4, 10, 1], "x2 < x1"),
])
def test_npz_boxes_outside_the_image_or_reversed_are_one_clear_line(tmp_path, box, words):
    y = np.empty(4, dtype=object)
    for i in range(4):
        y[i] = np.array([[1, 1, 5, 5, 0]], np.float32)
    y[2] = np.array([[1, 1, 5, 5, 0], box], np.float32)
    _save_npz(tmp_path / "bad.npz", y_bad=y)
    with pytest.raises(DataError) as e:
        load_data("npz", {"path": str(tmp_path / "bad.npz")})
    msg = str(e.value)
    assert words in msg and "y_val[2]" in msg and "box 1" in msg and "\n" not in msg


def test_digits_detect_provider_and_its_arguments():
    d = load_data("digits-detect", {"seed": 0, "n_train": 20, "n_val": 5, "n_test": 5})
    assert len(d.x_train) == 20 and d.y_val.dtype == object
    with pytest.raises(ConfigError, match="data.args.n_train"):
        load_data("digits-detect", {"n_train": 0})
    with pytest.raises(ConfigError, match="data.args"):
        load_data("digits-detect", {"canvas_size": 64})


BASE = {"source": "models:/det@champion", "data": {"provider": "digits-detect"},
        "stages": [{"quantize": {"method": "auto", "calibrators": ["entropy"]}}]}


def test_recipe_task_section_round_trips_and_classification_recipes_are_unchanged():
    plain = recipe_from_dict(dict(BASE))
    assert plain.task.kind == "classification" and "task" not in plain.to_dict()
    det = recipe_from_dict({**BASE, "task": {"kind": "detection", "num_classes": 10, "decoder": {
        "heads": [{"box": "output_0", "cls": "output_1", "stride": 4}]}, "gate": {"max_tp_score_drop": 0.02}}})
    assert det.task.decoder.heads[0].stride == 4 and det.task.gate.max_tp_score_drop == 0.02
    again = recipe_from_json(det.to_json())
    assert again.task == det.task and again.digest() == det.digest()
    assert det.digest() != plain.digest()


def test_recipe_task_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"task.decoder.heads\[0\].strides: unknown key; did you mean 'stride'"):
        recipe_from_dict({**BASE, "task": {"kind": "detection", "num_classes": 2, "decoder": {
            "heads": [{"box": "a", "cls": "b", "strides": 4}]}}})
    with pytest.raises(ConfigError, match="task.gate.max_map_drop"):
        recipe_from_dict({**BASE, "task": {"kind": "detection", "num_classes": 2, "decode_fn": "m:f",
                                           "gate": {"max_map_drop": -1}}})
