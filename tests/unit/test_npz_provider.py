"""The npz provider: bad files are one line naming the file and the fix, never a traceback."""

import numpy as np
import pytest

from edgeslim.components.common.errors import DataError
from edgeslim.plugins.datasets import NpzArrays


def _arrays(y_dtype=np.int64):
    x = np.zeros((20, 1, 8, 8), np.float32)
    return {f"{a}_{s}": (x if a == "x" else np.zeros(20, y_dtype)) for s in ("train", "val", "test") for a in "xy"}


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("keep", [0.5, 0.98, 0.01])
def test_a_truncated_npz_is_one_line(tmp_path, keep):
    path = tmp_path / "d.npz"
    np.savez(path, **_arrays())
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(DataError) as e:
        NpzArrays(path=str(path)).load()
    _one_line(e, str(path), "numpy.savez")


def test_a_corrupt_array_inside_a_valid_archive_is_one_line(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **_arrays())
    blob = bytearray(path.read_bytes())
    start = blob.index(b"x_train.npy") + 400  # inside the first member's data: the zip's CRC no longer matches
    blob[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        NpzArrays(path=str(path)).load()
    _one_line(e, str(path), "x_train")


def test_pickled_inputs_are_refused_and_pickled_box_labels_load(tmp_path):
    bad = _arrays()
    bad["x_train"] = np.array([object()] * 20, dtype=object)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DataError) as e:
        NpzArrays(path=str(tmp_path / "bad.npz")).load()
    _one_line(e, "x_train", "object array")
    det = _arrays()
    for s in ("train", "val", "test"):
        det[f"y_{s}"] = np.empty(20, dtype=object)
        for i in range(20):
            det[f"y_{s}"][i] = np.array([[1, 1, 5, 5, 3]], np.float32)
    np.savez(tmp_path / "det.npz", **det)
    splits = NpzArrays(path=str(tmp_path / "det.npz")).load()
    assert splits.y_test[0].shape == (1, 5)
