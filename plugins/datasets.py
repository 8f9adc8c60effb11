"""Data providers: where calibration, training and evaluation data come from.

A provider is a class in the ``edgeslim.datasets`` entry-point group. It is
built with the recipe's ``data.args`` as keyword arguments and its ``load()``
returns a :class:`~edgeslim.components.common.data.Splits`. Built-ins here:
``sklearn-digits``, ``npz`` and ``digits-detect``; the image providers (``imagefolder``,
``yolo``, ``coco``: streamed, local or S3) are in :mod:`.image_datasets`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from edgeslim.components.common.data import SPLIT_KEYS, Splits, check_labels
from edgeslim.components.common.errors import ConfigError, DataError


class SklearnDigits:
    """scikit-learn's bundled 8x8 digits, split with fixed seeds.

    Args:
        seed: the split's seed; the same seed always gives the same split.
        val_fraction: share of all samples in the validation split.
        test_fraction: share of all samples in the test split.
    """

    name = "sklearn-digits"

    def __init__(self, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2):
        if not (0 < val_fraction < 0.5 and 0 < test_fraction < 0.5):
            raise ConfigError(
                "data.args: val_fraction and test_fraction must each be in (0, 0.5); "
                f"got {val_fraction} and {test_fraction}"
            )
        self.seed, self.val_fraction, self.test_fraction = int(seed), val_fraction, test_fraction

    def describe(self) -> dict:
        return {"provider": self.name, "seed": self.seed, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction}

    def load(self) -> Splits:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
        y = d.target.astype(np.int64)
        order = np.random.default_rng(self.seed).permutation(len(x))
        n_test = int(round(len(x) * self.test_fraction))
        n_val = int(round(len(x) * self.val_fraction))
        te, va, tr = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        return Splits(x[tr], y[tr], x[va], y[va], x[te], y[te], source="sklearn-digits")


class NpzArrays:
    """Arrays from an ``.npz`` file, local or on S3.

    The file holds ``x_train``, ``y_train``, ``x_val``, ``y_val``, ``x_test`` and
    ``y_test``. ``x_*`` go to the model as they are. For a detector, ``y_*`` are
    object arrays: ``y[i]`` is a float32 ``(k, 5)`` array of ``[x1, y1, x2, y2, class]``
    boxes in input pixels (checked: inside the image, ``x1 <= x2``, ``y1 <= y2``).

    Args:
        path: a local path or ``s3://bucket/key``. For S3 the usual boto3
            settings apply, plus ``AWS_ENDPOINT_URL`` / ``endpoint_url`` for
            S3-compatible stores.
        endpoint_url: optional S3 endpoint.
    """

    name = "npz"

    def __init__(self, path: str = "", endpoint_url: str | None = None):
        if not path:
            raise ConfigError("data.args.path: required for the npz provider; give a .npz path or s3:// URI")
        self.path, self.endpoint_url = str(path), endpoint_url

    def describe(self) -> dict:
        return {"provider": self.name, "path": self.path}

    def _read_bytes(self) -> bytes:
        if self.path.startswith("s3://"):
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, _, key = self.path[5:].partition("/")
            try:
                s3 = boto3.client("s3", endpoint_url=self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
                return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except (BotoCoreError, ClientError) as exc:
                raise DataError(f"data {self.path}: cannot read from S3 ({exc}); check the URI and credentials") from None
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise DataError(f"data {p}: no such file; point data.args.path at an .npz with {', '.join(SPLIT_KEYS)}")
        return p.read_bytes()

    def load(self) -> Splits:
        import zipfile

        blob = self._read_bytes()
        unreadable = (ValueError, OSError, EOFError, zipfile.BadZipFile)
        try:
            arrays = np.load(io.BytesIO(blob), allow_pickle=False)
            files = arrays.files
        except unreadable as exc:
            raise DataError(f"data {self.path}: not a readable .npz ({exc}); save it with numpy.savez") from None
        missing = [k for k in SPLIT_KEYS if k not in files]
        if missing:
            raise DataError(f"data {self.path}: missing arrays {missing}; the .npz needs {', '.join(SPLIT_KEYS)}")
        parts, pickled = {}, None
        for k in SPLIT_KEYS:
            try:
                parts[k] = arrays[k]
            except ValueError as exc:
                if "allow_pickle" not in str(exc) or not k.startswith("y_"):
                    raise DataError(f"data {self.path}: array {k} cannot be read ({exc}); save it with "
                                    "numpy.savez as numbers (only detection labels may be an object array)") from None
                # Detection labels: one (k, 5) array per image, stored as an object array (pickled).
                pickled = pickled if pickled is not None else np.load(io.BytesIO(blob), allow_pickle=True)
                parts[k] = pickled[k]
            except unreadable as exc:
                raise DataError(f"data {self.path}: array {k} is corrupt or truncated ({exc}); write the "
                                ".npz again with numpy.savez") from None
        for split in ("train", "val", "test"):
            check_labels(parts[f"x_{split}"], parts[f"y_{split}"], f"{self.path}:{split}")
            if parts[f"y_{split}"].dtype == object:
                parts[f"y_{split}"] = check_boxes(parts[f"x_{split}"], parts[f"y_{split}"],
                                                  f"{self.path}:y_{split}")
        return Splits(**parts, source=self.path)


def check_boxes(x: np.ndarray, y: np.ndarray, where: str) -> np.ndarray:
    """Detection labels: per image a (k, 5) ``[x1, y1, x2, y2, class]`` array inside the image.

    Returns:
        The labels as an object array of float32 (k, 5) arrays.

    Raises:
        DataError: a label is not (k, 5), or a box lies outside the image or has x2 < x1 / y2 < y1.
    """
    height, width = x.shape[-2], x.shape[-1]
    out = np.empty(len(y), dtype=object)
    for i, lab in enumerate(y):
        a = np.asarray(lab, dtype=np.float32)
        if a.size == 0:
            a = a.reshape(0, 5)
        if a.ndim != 2 or a.shape[1] != 5:
            raise DataError(f"data {where}[{i}]: got shape {list(a.shape)}; each label is a (k, 5) array "
                            "[x1, y1, x2, y2, class] in input pixels")
        for j, (x1, y1, x2, y2, c) in enumerate(a):
            box = f"box {j} [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
            if x2 < x1 or y2 < y1:
                raise DataError(f"data {where}[{i}]: {box} has x2 < x1 or y2 < y1; boxes are "
                                "[x1, y1, x2, y2] with the top-left corner first")
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise DataError(f"data {where}[{i}]: {box} lies outside the {width}x{height} image; "
                                "give boxes in input pixels, clipped to the image")
            if c < 0 or c != int(c):
                raise DataError(f"data {where}[{i}]: {box} has class {c:g}; classes are whole numbers from 0")
        out[i] = a
    return out


def digits_detect(**kw):
    """The demo detector's synthetic canvases (provider ``digits-detect``)."""
    from edgeslim.components.reference.detector import DigitsDetection

    return DigitsDetection(**kw)
