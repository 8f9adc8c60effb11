"""The ``masks`` data provider: images and their class-map PNGs, local or on S3, streamed.

Each split is a folder of images and a folder of masks with the same file stems::

    root/train/images/0001.jpg     root/train/masks/0001.png
    root/val/images/...            root/val/masks/...
    root/test/images/...           root/test/masks/...

A mask is a single-channel PNG (8-bit grey, palette as Pascal VOC writes them, or 16-bit) whose pixel
values are class ids, at the image's size. Like ``imagefolder``, the provider lists the files once and
returns :class:`~edgeslim.components.common.data.Splits` whose ``x_*`` are lazy images and whose
``y_*`` are lazy masks (:class:`LazyMasks`): a batch's files are read when a stage indexes it. The
recipe's ``data.preprocess`` geometry (resize, letterbox, crop) is applied to the masks with
nearest-neighbour resampling; pixels the letterbox pads or a crop reaches past the image get
``pad_label`` (the task's ``ignore_index``, 255 by default), so they count for no class.

Registered in the entry-point group ``edgeslim.datasets`` as ``masks``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.image_files import Files, open_files
from edgeslim.components.common.image_preprocess import ImagePreprocessConfig, open_image
from edgeslim.components.common.lazy_images import LazyImages, _pool, default_workers

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def preprocess_mask(im, config: ImagePreprocessConfig, pad_label: int) -> np.ndarray:
    """A class-map image as an ``(H, W)`` int32 mask placed as ``config`` places its image: nearest
    resampling, ``pad_label`` where the letterbox pads or the crop reaches past the image."""
    from PIL import Image

    if im.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"mode {im.mode}")
    m = np.asarray(im if im.mode != "I;16" else im.convert("I"), dtype=np.int32)
    g = config.geometry(*im.size)
    if g.resized != im.size:
        m = np.asarray(Image.fromarray(m).resize(g.resized, resample=Image.Resampling.NEAREST), np.int32)
    if g.pad is not None:
        canvas = np.full((g.canvas[1], g.canvas[0]), pad_label, np.int32)
        canvas[g.pad[1]:g.pad[1] + m.shape[0], g.pad[0]:g.pad[0] + m.shape[1]] = m
        m = canvas
    if g.crop is not None:
        left, top, cw, ch = g.crop
        out = np.full((ch, cw), pad_label, np.int32)
        ys, xs = slice(max(top, 0), min(top + ch, m.shape[0])), slice(max(left, 0), min(left + cw, m.shape[1]))
        out[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = m[ys, xs]
        m = out
    return np.ascontiguousarray(m)


class LazyMasks:
    """Mask files of one split as a lazy ``(N, H, W)`` int32 array, read a batch at a time.

    Args:
        files: where the masks are.
        keys: the split's mask keys, in row order (the images' order).
        preprocess: the images' preprocessing (its geometry is applied).
        hw: the rows' (height, width), the model input's.
        pad_label: the class of padded pixels.
        sizes: file sizes (for :meth:`digest`).
        workers: decode threads.
    """

    dtype = np.dtype(np.int32)
    ndim = 3

    def __init__(self, files: Files, keys: Sequence[str], preprocess: ImagePreprocessConfig, *,
                 hw: tuple[int, int] | None, pad_label: int = 255, sizes: Sequence[int] | None = None,
                 workers: int | None = None):
        self.files, self.keys, self.preprocess = files, list(keys), preprocess
        self._hw, self.pad_label = hw, int(pad_label)
        self.sizes = list(sizes) if sizes is not None else [-1] * len(self.keys)
        self.workers = int(workers or default_workers())

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, ...]:
        if self._hw is None:
            self._hw = self._decode(0).shape if self.keys else (0, 0)
        return (len(self.keys), *self._hw)

    def __repr__(self) -> str:
        return f"LazyMasks({len(self)} masks of {self.files.root})"

    def _decode(self, i: int) -> np.ndarray:
        where = self.files.url(self.keys[i])
        im = open_image(self.files.read(self.keys[i]), where)
        try:
            return preprocess_mask(im, self.preprocess, self.pad_label)
        except ValueError:
            raise DataError(f"data {where}: a {im.mode} image; a mask is a single-channel PNG of class ids "
                            "(8-bit grey, palette or 16-bit): write it as such") from None

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self.keys)
        if isinstance(key, (int, np.integer)):
            return self._rows([int(key) % n])[0]
        if isinstance(key, slice):
            rows = list(range(*key.indices(n)))
        else:
            idx = np.asarray(key.numpy() if hasattr(key, "numpy") else key)
            rows = list(np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1) % max(n, 1))
        return self._rows(rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _rows(self, rows: list[int]) -> np.ndarray:
        hw = self.shape[1:]
        out = np.empty((len(rows), *hw), np.int32)

        def one(r: int) -> np.ndarray:
            m = self._decode(r)
            if m.shape != tuple(hw):
                raise DataError(f"data {self.files.url(self.keys[r])}: the mask comes out {list(m.shape)} but the "
                                f"split's masks are {list(hw)}; give every mask its image's size, and set "
                                "data.preprocess (resize, letterbox or center_crop) to one input size")
            return m

        decoded = list(_pool(self.workers).map(one, rows)) if self.workers > 1 and len(rows) > 1 else \
            [one(r) for r in rows]
        for k, m in enumerate(decoded):
            out[k] = m
        return out

    def digest(self) -> str:
        """sha256 of the file names, sizes, the preprocessing and the pad label (no pixel is read)."""
        h = hashlib.sha256()
        h.update(json.dumps({**self.preprocess.to_dict(), "pad_label": self.pad_label}, sort_keys=True).encode())
        for k, s in zip(self.keys, self.sizes):
            h.update(f"{k}\0{s}\n".encode())
        return h.hexdigest()


class MaskFolder:
    """Images and class-map PNGs per split (provider ``masks``).

    Args:
        root: a local folder or ``s3://bucket/prefix`` holding ``train/``, ``val/`` and ``test/``.
        endpoint_url: the S3 endpoint of an S3-compatible store.
        preprocess: the recipe's ``data.preprocess`` (passed by ``load_data``).
        images: the image folder's name inside a split folder.
        masks: the mask folder's name inside a split folder.
        split_dirs: the folders of the splits (default ``{train: train, val: val, test: test}``).
        pad_label: the class of pixels the letterbox pads or a crop adds (the task's ``ignore_index``).
        workers: decode threads.
    """

    name = "masks"

    def __init__(self, root: str = "", endpoint_url: str | None = None, preprocess=None, images: str = "images",
                 masks: str = "masks", split_dirs: dict | None = None, pad_label: int = 255,
                 workers: int | None = None):
        if not root:
            raise ConfigError("data.args.root: required for the masks provider; give a folder holding "
                              "train/, val/ and test/, each with images/ and masks/ (local or s3://bucket/prefix)")
        if isinstance(preprocess, dict):
            preprocess = ImagePreprocessConfig.from_dict(preprocess, prefix="data.preprocess")
        unknown = sorted(set(split_dirs or {}) - set(SPLITS))
        if unknown:
            raise ConfigError(f"data.args.split_dirs: unknown split {unknown[0]!r}; use train, val and test")
        if isinstance(pad_label, bool) or not isinstance(pad_label, int) or not 0 <= pad_label < 65536:
            raise ConfigError(f"data.args.pad_label: got {pad_label!r}; use a class id no class has, e.g. 255")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"data.args.workers: got {workers!r}; use a whole number of decode threads >= 1")
        self.location, self.endpoint_url = str(root), endpoint_url
        self.preprocess = preprocess or ImagePreprocessConfig()
        self.images, self.masks = str(images).strip("/"), str(masks).strip("/")
        self.split_dirs = {s: str((split_dirs or {}).get(s, s)).strip("/") for s in SPLITS}
        self.pad_label, self.workers = pad_label, workers or default_workers()

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "path": self.location, "preprocess": self.preprocess.to_dict(),
                "images": self.images, "masks": self.masks, "pad_label": self.pad_label}

    def load(self) -> Splits:
        files = open_files(self.location, self.endpoint_url)
        listing = files.list()
        parts: dict[str, Any] = {}
        for split in SPLITS:
            img_dir = posixpath.join(self.split_dirs[split], self.images)
            mask_dir = posixpath.join(self.split_dirs[split], self.masks)
            images = sorted(k for k in listing if k.startswith(img_dir + "/") and k.lower().endswith(IMAGE_SUFFIXES))
            if not images:
                raise DataError(f"data {files.url(img_dir)}: the {split} split has no images; add them (and their "
                                f"masks in {files.url(mask_dir)}), or map the split with data.args.split_dirs")
            masks = {posixpath.splitext(k[len(mask_dir) + 1:])[0]: k for k in listing
                     if k.startswith(mask_dir + "/") and k.lower().endswith(".png")}
            keys = []
            for k in images:
                stem = posixpath.splitext(k[len(img_dir) + 1:])[0]
                if stem not in masks:
                    raise DataError(f"data {files.url(k)}: no mask {files.url(posixpath.join(mask_dir, stem + '.png'))}; "
                                    "add the image's class-map PNG or remove the image")
                keys.append(masks[stem])
            x = LazyImages(files, images, self.preprocess, sizes=[listing[k] for k in images], workers=self.workers,
                           split=split)
            hw = self.preprocess.output_hw() or tuple(x.shape[-2:] if self.preprocess.layout == "NCHW"
                                                      else x.shape[1:3])
            parts[f"x_{split}"] = x
            parts[f"y_{split}"] = LazyMasks(files, keys, self.preprocess, hw=hw, pad_label=self.pad_label,
                                            sizes=[listing[k] for k in keys], workers=self.workers)
        return Splits(**parts, source=files.root)
