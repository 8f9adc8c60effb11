"""Image data providers, local or on S3, streamed: ``imagefolder``, ``yolo`` and ``coco``.

Each lists its files once (sizes included, no image read), reads the labels (small: class
indices, or boxes), and returns :class:`~edgeslim.components.common.data.Splits` whose ``x_*``
are :class:`~edgeslim.components.common.lazy_images.LazyImages`: a batch's images are read,
decoded and preprocessed (the recipe's ``data.preprocess``) when a stage indexes that batch,
never the whole split. Detection labels are per image a float32 ``(k, 5)`` array
``[x1, y1, x2, y2, class]`` in model-input pixels (after the preprocessing's resize, letterbox
and crop), as the ``npz`` and ``digits-detect`` providers give them. With ``masks: true`` the
``yolo`` and ``coco`` providers read the instances' outlines instead (polygons, COCO RLE) and give
per-image ``(k, H, W)`` instance stacks (:mod:`~edgeslim.plugins.instance_labels`).

Locations are a local path or ``s3://bucket/prefix``; for S3-compatible stores the endpoint is
``endpoint_url``, else ``$EDGESLIM_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL``; credentials come
from boto3's usual chain.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.data import DeferredLabels, Splits
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.image_files import Files, open_files, split_location
from edgeslim.components.common.image_preprocess import ImagePreprocessConfig, image_size
from edgeslim.components.common.lazy_images import LazyImages, _pool, default_workers
from edgeslim.plugins.instance_labels import LazyInstances, coco_shape

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# How far a label may reach past the image edge before it is an error (then it is clipped):
# YOLO labels are normalised and often rounded; COCO boxes are floats in pixels.
YOLO_TOLERANCE = 1e-3
COCO_TOLERANCE_PX = 1.0
_MAP_CHUNK = 256  # items handed to the decode threads at a time (see _ImageProvider._map)


def is_image(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES)


class _ImageProvider:
    """What the image providers share: where the files are, the preprocessing, the decode threads."""

    name = ""

    def __init__(self, location: str, endpoint_url: str | None, preprocess: ImagePreprocessConfig | dict | None,
                 workers: int | None):
        if isinstance(preprocess, dict):
            preprocess = ImagePreprocessConfig.from_dict(preprocess, prefix="data.preprocess")
        self.location, self.endpoint_url = str(location), endpoint_url
        self.preprocess = preprocess or ImagePreprocessConfig()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"data.args.workers: got {workers!r}; use a whole number of decode threads >= 1")
        self.workers = workers or default_workers()

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "path": self.location, "preprocess": self.preprocess.to_dict()}

    def _lazy(self, files: Files, keys: Sequence[str], sizes: Sequence[int], split: str) -> LazyImages:
        return LazyImages(files, keys, self.preprocess, sizes=sizes, workers=self.workers, split=split)

    def _map(self, fn, items: Sequence) -> list:
        """``fn`` over ``items`` on the decode threads (label files and image headers are many small reads),
        a few hundred at a time: the pool holds a future per item it is given, so a split handed over whole
        would hold one per image."""
        if len(items) <= 1 or self.workers <= 1:
            return [fn(i) for i in items]
        out: list = []
        for a in range(0, len(items), _MAP_CHUNK):
            out.extend(_pool(self.workers).map(fn, items[a:a + _MAP_CHUNK]))
        return out

    def _box_labels(self, fn, items: Sequence) -> np.ndarray:
        """``fn``'s ``(k, 5)`` float32 boxes of each of ``items``, made on the decode threads (:meth:`_map`), as
        an object array of views into one buffer per few hundred images: what the threads made is freed as
        each part is packed, and a split's labels cost a view an image beside their boxes."""
        out = np.empty(len(items), dtype=object)
        for a in range(0, len(items), _MAP_CHUNK):
            part = self._map(fn, items[a:a + _MAP_CHUNK])
            buf = np.concatenate(part).astype(np.float32, copy=False)
            ends = np.cumsum([len(p) for p in part])
            out[a:a + len(part)] = [buf[e - len(p):e] for p, e in zip(part, ends)]
        return out

    def _check_masks(self, masks: Any) -> bool:
        if not isinstance(masks, bool):
            raise ConfigError(f"data.args.masks: got {masks!r}; use true (instance masks) or false (boxes)")
        if masks and self.preprocess.output_hw() is None:
            raise ConfigError("data.args.masks: instance masks need one input size; set data.preprocess letterbox, "
                              "resize: [h, w] or center_crop")
        return masks

    def _labels_in_input_pixels(self, xyxy: np.ndarray, cls: np.ndarray, width: float, height: float) -> np.ndarray:
        """Source-pixel boxes of a ``width`` x ``height`` image as ``(k, 5)`` in model-input pixels."""
        boxes, keep = self.preprocess.geometry(int(round(width)), int(round(height))).boxes(xyxy)
        return np.concatenate([boxes[keep], cls[keep, None].astype(np.float32)], 1).reshape(-1, 5)


# --------------------------------------------------------------------------- imagefolder

class ImageFolder(_ImageProvider):
    """Class sub-folders, per split or in one folder (provider ``imagefolder``).

    ``root/{train,val,test}/<class>/**/*.jpg|png|...``, or ``root/<class>/**/*`` split by
    ``val_fraction`` / ``test_fraction`` with ``seed`` (the same files and seed always give the
    same split). Class indices follow the sorted folder names of the train split (or ``classes``).

    Args:
        root: a local folder or ``s3://bucket/prefix``.
        endpoint_url: the S3 endpoint of an S3-compatible store.
        preprocess: the recipe's ``data.preprocess`` (passed by :func:`~edgeslim.components.common.data.load_data`).
        val_fraction: with one folder, the share of images in the validation split.
        test_fraction: with one folder, the share of images in the test split.
        seed: with one folder, the split's seed.
        split_dirs: the folders of the splits (default ``{train: train, val: val, test: test}``).
        classes: class names in index order (default: the train split's folders, sorted).
        workers: decode threads.
    """

    name = "imagefolder"

    def __init__(self, root: str = "", endpoint_url: str | None = None, preprocess=None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 split_dirs: dict | None = None, classes: list | None = None, workers: int | None = None):
        if not root:
            raise ConfigError("data.args.root: required for the imagefolder provider; give a folder of "
                              "class folders (local or s3://bucket/prefix)")
        super().__init__(root, endpoint_url, preprocess, workers)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(f"data.args: val_fraction and test_fraction must each be in (0, 1) with a sum "
                              f"under 1; got {val_fraction} and {test_fraction}")
        dirs = {s: s for s in SPLITS}
        unknown = sorted(set(split_dirs or {}) - set(SPLITS))
        if unknown:
            raise ConfigError(f"data.args.split_dirs: unknown split {unknown[0]!r}; use train, val and test")
        dirs.update(split_dirs or {})
        self.split_dirs = {k: str(v).strip("/") for k, v in dirs.items()}
        self.val_fraction, self.test_fraction, self.seed = float(val_fraction), float(test_fraction), int(seed)
        self.classes = list(classes) if classes else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "seed": self.seed}

    def load(self) -> Splits:
        files = open_files(self.location, self.endpoint_url)
        listing = {k: s for k, s in files.list().items() if is_image(k)}
        if not listing:
            raise DataError(f"data {files.root}: no images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) found; point "
                            "data.args.root at a folder of class folders, or of train/val/test folders")
        tops = {k.split("/", 1)[0] for k in listing if "/" in k}
        if self.split_dirs["train"] in tops:
            return self._load_split_folders(files, listing)
        return self._load_one_folder(files, listing)

    def _per_class(self, files: Files, listing: dict[str, int], prefix: str, where: str) -> dict[str, list[str]]:
        """Class name -> image keys under ``prefix`` (``prefix/<class>/**``)."""
        out: dict[str, list[str]] = {}
        loose = []
        for k in listing:
            if prefix and not k.startswith(prefix + "/"):
                continue
            rel = k[len(prefix) + 1:] if prefix else k
            if "/" not in rel:
                loose.append(k)
                continue
            out.setdefault(rel.split("/", 1)[0], []).append(k)
        if loose:
            log.warning("data %s: %d image(s) outside class folders are left out (e.g. %s)", where, len(loose),
                        files.url(loose[0]))
        return dict(sorted(out.items()))

    def _class_index(self, found: Sequence[str]) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.classes or sorted(found))}

    def _labels(self, files: Files, per_class: dict[str, list[str]], index: dict[str, int], prefix: str,
                split: str) -> tuple[list[str], np.ndarray]:
        keys, labels = [], []
        for cls, ks in per_class.items():
            if cls not in index:
                raise DataError(
                    f"data {files.url(posixpath.join(prefix, cls))}: class folder {cls!r} of the {split} split is not "
                    f"one of the {len(index)} classes ({', '.join(list(index)[:6])}{', ...' if len(index) > 6 else ''}); "
                    "add the class to the train split (and data.args.classes) or remove the folder")
            keys += ks
            labels += [index[cls]] * len(ks)
        order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
        return [keys[i] for i in order], np.asarray(labels, np.int64)[order]

    def _load_split_folders(self, files: Files, listing: dict[str, int]) -> Splits:
        parts: dict[str, Any] = {}
        index: dict[str, int] = {}
        for split in SPLITS:
            prefix = self.split_dirs[split]
            per_class = self._per_class(files, listing, prefix, files.url(prefix))
            if not per_class:
                raise DataError(
                    f"data {files.url(prefix)}: the {split} split has no images in class folders "
                    f"({prefix}/<class>/*.jpg); add them, or map the split to another folder with "
                    "data.args.split_dirs")
            if split == "train":
                index = self._class_index(list(per_class))
            keys, labels = self._labels(files, per_class, index, prefix, split)
            parts[f"x_{split}"] = self._lazy(files, keys, [listing[k] for k in keys], split)
            parts[f"y_{split}"] = labels
        self.classes = list(index)
        return Splits(**parts, source=files.root)

    def _load_one_folder(self, files: Files, listing: dict[str, int]) -> Splits:
        per_class = self._per_class(files, listing, "", files.root)
        if not per_class:
            raise DataError(f"data {files.root}: no class folders with images; lay the data out as "
                            "root/<class>/*.jpg or root/{train,val,test}/<class>/*.jpg")
        index = self._class_index(list(per_class))
        keys, labels = self._labels(files, per_class, index, "", "one-folder")
        n = len(keys)
        order = np.random.default_rng(self.seed).permutation(n)
        n_test, n_val = int(round(n * self.test_fraction)), int(round(n * self.val_fraction))
        if n_test < 1 or n_val < 1 or n - n_test - n_val < 1:
            raise DataError(f"data {files.root}: {n} images leave an empty split with val_fraction "
                            f"{self.val_fraction} and test_fraction {self.test_fraction}; add images or raise "
                            "the fractions")
        rows = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        parts: dict[str, Any] = {}
        for split, r in rows.items():
            r = np.sort(r)  # listing order: neighbouring files are read together
            ks = [keys[i] for i in r]
            parts[f"x_{split}"] = self._lazy(files, ks, [listing[k] for k in ks], split)
            parts[f"y_{split}"] = labels[r]
        self.classes = list(index)
        return Splits(**parts, source=files.root)


# --------------------------------------------------------------------------- yolo

def _names(raw: Any, where: str) -> list[str]:
    if isinstance(raw, list):
        return [str(n) for n in raw]
    if isinstance(raw, dict):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            ids = []
        if ids != list(range(len(raw))):
            raise DataError(f"data {where}: names: must map the class indices 0..{len(raw) - 1} to names, "
                            "e.g. {0: person, 1: car}")
        return [str(raw[k] if k in raw else raw[str(k)]) for k in range(len(raw))]
    raise DataError(f"data {where}: names: got {type(raw).__name__}; give a list or a mapping 0: name, 1: name, ...")


def label_key(image_key: str) -> str:
    """Ultralytics' label file of an image: the last ``/images/`` becomes ``/labels/``, the suffix ``.txt``."""
    k = "/" + image_key
    head, sep, tail = k.rpartition("/images/")
    k = head + "/labels/" + tail if sep else k
    return posixpath.splitext(k[1:])[0] + ".txt"


def parse_yolo_label(text: str, num_classes: int, where: str, polygons: list | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A YOLO label file: normalised ``[x1, y1, x2, y2]`` boxes and their classes.

    A line is ``class cx cy w h`` (a box) or ``class x1 y1 x2 y2 x3 y3 ...`` (a polygon, whose
    bounding box is taken), every coordinate a share of the image's width or height. Given a
    ``polygons`` list, every line must be a polygon and each is appended as normalised ``(n, 2)`` points.

    Raises:
        DataError: an unparsable line, a class out of range, a box outside the image, or a box
            line where ``polygons`` asks for outlines.
    """
    boxes, classes = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [float(p) for p in parts]
            if not np.isfinite(vals).all():
                raise ValueError
        except ValueError:
            raise DataError(f"data {where} line {n}: {line.strip()[:60]!r} is not numbers; a YOLO label line is "
                            "'class cx cy w h' with coordinates as shares of the image size") from None
        c = vals[0]
        if c != int(c) or not 0 <= c < num_classes:
            raise DataError(f"data {where} line {n}: class {c:g} is out of range; data.yaml names {num_classes} "
                            f"classes (0..{num_classes - 1}); fix the label or add the class to names:")
        if len(vals) == 5 and polygons is not None:
            raise DataError(f"data {where} line {n}: a box; data.args.masks: true needs Ultralytics segmentation "
                            "labels 'class x1 y1 x2 y2 x3 y3 ...' (a polygon per object), or drop masks for boxes")
        if len(vals) == 5:
            cx, cy, w, h = vals[1:]
            if w < 0 or h < 0:
                raise DataError(f"data {where} line {n}: box width/height {w:g}/{h:g} is negative; a YOLO label "
                                "line is 'class cx cy w h'")
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(vals) >= 7 and len(vals) % 2 == 1:
            pts = np.asarray(vals[1:]).reshape(-1, 2)
            box = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
            if polygons is not None:
                polygons.append(pts.clip(0.0, 1.0))
        else:
            raise DataError(f"data {where} line {n}: {len(vals)} numbers; a YOLO label line is 'class cx cy w h' "
                            "(5 numbers) or a polygon 'class x1 y1 x2 y2 x3 y3 ...'")
        if min(box) < -YOLO_TOLERANCE or max(box) > 1 + YOLO_TOLERANCE:
            raise DataError(f"data {where} line {n}: box [{', '.join(f'{v:.4g}' for v in box)}] lies outside the "
                            "image; YOLO coordinates are shares of the image size in [0, 1]: fix or clip the label")
        boxes.append(np.clip(box, 0.0, 1.0))
        classes.append(int(c))
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes, np.int64)


class YoloDataset(_ImageProvider):
    """An Ultralytics dataset: ``data.yaml`` with ``train:``, ``val:``, ``test:`` and ``names:``
    (provider ``yolo``).

    Each split is an image folder (searched recursively), a ``.txt`` list of images, or a list of
    those, relative to the yaml's ``path:`` (itself relative to the yaml's folder; default that
    folder). An image's labels are in the matching ``labels/`` file (``images/train/a.jpg`` ->
    ``labels/train/a.txt``), one ``class cx cy w h`` line per object, normalised; an image
    without a label file has no objects. With ``masks`` the lines are Ultralytics segmentation
    polygons ``class x1 y1 x2 y2 ...`` and ``y_*`` are instance stacks.

    Args:
        path: the ``data.yaml``, local or ``s3://bucket/prefix/data.yaml``.
        endpoint_url: the S3 endpoint of an S3-compatible store.
        preprocess: the recipe's ``data.preprocess`` (``letterbox`` is what Ultralytics models expect).
        workers: decode threads (also reading label files and image headers).
        masks: per-image ``(k, H, W)`` instance stacks from polygon labels instead of boxes.
    """

    name = "yolo"

    def __init__(self, path: str = "", endpoint_url: str | None = None, preprocess=None, workers: int | None = None,
                 masks: bool = False):
        if not path:
            raise ConfigError("data.args.path: required for the yolo provider; give the dataset's data.yaml "
                              "(local or s3://bucket/prefix/data.yaml)")
        super().__init__(path, endpoint_url, preprocess, workers)
        self.masks = self._check_masks(masks)
        self.classes: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "masks": True} if self.masks else super().describe()

    def _yaml(self) -> tuple[dict, Files, str]:
        import yaml

        folder, name = split_location(self.location)
        blob = open_files(folder, self.endpoint_url).read(name)
        try:
            doc = yaml.safe_load(blob)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise DataError(f"data {self.location}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}; "
                            "fix the syntax") from None
        if not isinstance(doc, dict):
            raise DataError(f"data {self.location}: expected a mapping with train:, val:, test: and names:")
        for key, example in (("train", "images/train"), ("val", "images/val"), ("test", "images/test"),
                             ("names", "{0: person, 1: car}")):
            if not doc.get(key):
                why = " (edgeslim's gate reads a held-out test split)" if key == "test" else ""
                raise DataError(f"data {self.location}: no {key}: key{why}; add e.g. '{key}: {example}'")
        base = doc.get("path")
        if base:
            base = str(base)
            if not (base.startswith("s3://") or Path(base).is_absolute()):
                base = posixpath.normpath(posixpath.join(folder, base)).replace("s3:/", "s3://", 1) \
                    if folder.startswith("s3://") else str(Path(folder) / base)
        else:
            base = folder
        return doc, open_files(base, self.endpoint_url), folder

    def _split_images(self, doc: dict, split: str, files: Files, listing: dict[str, int]) -> list[str]:
        entries = doc[split] if isinstance(doc[split], list) else [doc[split]]
        keys: list[str] = []
        for raw in entries:
            e = posixpath.normpath(str(raw)).strip("/")
            if e.startswith("../") and not any(k.startswith(e + "/") for k in listing):
                e = e[3:]  # Ultralytics' fallback for exports that say ../train/images beside the yaml
            if e.endswith(".txt"):
                lines = files.read(e).decode("utf-8", "replace").splitlines()
                keys += [posixpath.normpath(ln.strip()) for ln in lines if ln.strip()]
            else:
                keys += [k for k in listing if k.startswith(e + "/") and is_image(k)]
        missing = [k for k in keys if k not in listing]
        if missing:
            raise DataError(f"data {files.url(missing[0])}: listed for the {split} split in {self.location} but "
                            "missing; fix the list or add the image")
        if not keys:
            raise DataError(f"data {self.location}: {split}: {doc[split]} holds no images under {files.root}; "
                            "point it at the split's image folder")
        return sorted(dict.fromkeys(keys))

    def _labels(self, files: Files, keys: Sequence[str], labelled: np.ndarray):
        """One split's labels, read from its label files (and, where the preprocessing needs the source size,
        its images' headers) on the decode threads: boxes, or instance outlines with ``masks``."""
        need_size = self.preprocess.boxes_need_source_size()
        target = self.preprocess.output_hw()

        def labels_of(i: int):
            key = keys[i]
            lk = label_key(key)
            polys: list | None = [] if self.masks else None
            xyxy, cls = (parse_yolo_label(files.read(lk).decode("utf-8", "replace"), len(self.classes),
                                          files.url(lk), polys)
                         if labelled[i] else (np.zeros((0, 4)), np.zeros(0, np.int64)))
            if need_size:
                try:
                    w, h = image_size(files.read_head(key), files.url(key))
                except DataError:  # a header past the first 64 kB (large EXIF): read it all
                    w, h = image_size(files.read(key), files.url(key))
            else:  # resize to exactly [h, w]: normalised boxes scale straight to the input
                h, w = target
            if polys is not None:
                return (w, h, cls, [("poly", [p * [w, h]]) for p in polys])
            return self._labels_in_input_pixels(xyxy * [w, h, w, h], cls, w, h)

        rows = range(len(keys))
        if self.masks:
            return LazyInstances(self._map(labels_of, rows), self.preprocess)
        return self._box_labels(labels_of, rows)

    def load(self) -> Splits:
        doc, files, _ = self._yaml()
        self.classes = _names(doc["names"], self.location)
        nc = doc.get("nc")
        if nc is not None and nc != len(self.classes):
            raise DataError(f"data {self.location}: nc: {nc} but names: lists {len(self.classes)} classes; make "
                            "them agree (or drop nc:)")
        listing = files.list()
        parts: dict[str, Any] = {}
        for split in SPLITS:
            keys = self._split_images(doc, split, files, listing)
            # images without a label file have no boxes (a byte an image: the listing is not kept)
            labelled = np.fromiter((label_key(k) in listing for k in keys), bool, len(keys))
            parts[f"x_{split}"] = self._lazy(files, keys, [listing[k] for k in keys], split)
            parts[f"y_{split}"] = DeferredLabels(len(keys), functools.partial(self._labels, files, keys, labelled),
                                                 f"{self.location} {split}")
        return Splits(**parts, source=self.location)


# --------------------------------------------------------------------------- coco

class CocoDataset(_ImageProvider):
    """COCO-style detection data: an instances JSON and an image folder per split (provider ``coco``).

    Categories are numbered in the order of their ids (the train JSON's; val and test must have the
    same); crowd annotations (``iscrowd: 1``) are left out, as COCO's evaluation ignores them.
    Boxes (``[x, y, w, h]`` in source pixels) go through the preprocessing's geometry; the source
    size comes from the JSON's ``width``/``height``, so no image is read to load the labels. With
    ``masks`` each annotation's ``segmentation`` (polygons, or RLE with list or compressed counts)
    gives its mask and ``y_*`` are instance stacks.

    Args:
        root: the dataset folder, local or ``s3://bucket/prefix``.
        endpoint_url: the S3 endpoint of an S3-compatible store.
        preprocess: the recipe's ``data.preprocess``.
        splits: per split ``{annotations: <json>, images: <folder>}`` relative to ``root``; default
            ``annotations/instances_<split>.json`` and ``images/<split>``.
        workers: decode threads.
        masks: per-image ``(k, H, W)`` instance stacks from the annotations' outlines instead of boxes.
    """

    name = "coco"

    def __init__(self, root: str = "", endpoint_url: str | None = None, preprocess=None,
                 splits: dict | None = None, workers: int | None = None, masks: bool = False):
        if not root:
            raise ConfigError("data.args.root: required for the coco provider; give the folder holding "
                              "annotations/ and images/ (local or s3://bucket/prefix)")
        super().__init__(root, endpoint_url, preprocess, workers)
        self.splits = {s: {"annotations": f"annotations/instances_{s}.json", "images": f"images/{s}"} for s in SPLITS}
        for s, v in (splits or {}).items():
            if s not in SPLITS or not isinstance(v, dict) or set(v) - {"annotations", "images"}:
                raise ConfigError(f"data.args.splits.{s}: use one of train, val, test, each "
                                  "{annotations: <json>, images: <folder>}")
            self.splits[s].update({k: str(x).strip("/") for k, x in v.items()})
        self.masks = self._check_masks(masks)
        self.classes: list[str] = []
        self._category_ids: list[int] = []

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "splits": self.splits, **({"masks": True} if self.masks else {})}

    def _read_json(self, files: Files, key: str) -> dict:
        blob = files.read(key)
        try:
            doc = json.loads(blob)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"data {files.url(key)}: not valid JSON ({str(exc)[:80]}); write the COCO instances "
                            "file again") from None
        for k in ("images", "annotations", "categories"):
            if not isinstance(doc.get(k) if isinstance(doc, dict) else None, list):
                raise DataError(f"data {files.url(key)}: no {k!r} list; a COCO instances JSON has images, "
                                "annotations and categories")
        return doc

    def load(self) -> Splits:
        files = open_files(self.location, self.endpoint_url)
        parts: dict[str, Any] = {}
        for split in SPLITS:
            ann_key, img_dir = self.splits[split]["annotations"], self.splits[split]["images"]
            where = files.url(ann_key)
            doc = self._read_json(files, ann_key)
            cats = sorted(int(c["id"]) for c in doc["categories"])
            if split == "train":
                self._category_ids = cats
                by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in doc["categories"]}
                self.classes = [by_id[i] for i in cats]
            elif cats != self._category_ids:
                raise DataError(f"data {where}: its categories (ids {cats[:8]}) differ from the train split's "
                                f"({self._category_ids[:8]}); give every split the same categories")
            index = {c: i for i, c in enumerate(self._category_ids)}
            listing = files.list(img_dir)
            images = sorted(doc["images"], key=lambda im: str(im.get("file_name", "")))
            if not images:
                raise DataError(f"data {where}: the {split} split lists no images; add images to it")
            info = {}
            for im in images:
                key = posixpath.join(img_dir, str(im["file_name"]))
                if key not in listing:
                    raise DataError(f"data {files.url(key)}: listed in {where} but missing from the image folder; "
                                    "add the image or remove it from the JSON")
                info[im["id"]] = (key, float(im["width"]), float(im["height"]))
            boxes: dict[Any, list] = {i: [] for i in info}
            shapes: dict[Any, list] = {i: [] for i in info}
            for a in doc["annotations"]:
                if a.get("iscrowd", 0):
                    continue
                aid = a.get("id", "?")
                if a.get("image_id") not in info:
                    raise DataError(f"data {where}: annotation {aid} refers to image_id {a.get('image_id')!r}, "
                                    "which the images list lacks; fix the annotation or add the image")
                key, w, h = info[a["image_id"]]
                c = a.get("category_id")
                if c not in index:
                    raise DataError(f"data {where}: annotation {aid} ({key}) has category_id {c!r}, not one of the "
                                    f"categories {self._category_ids[:8]}{' ...' if len(index) > 8 else ''}; fix "
                                    "the label or add the category")
                x, y, bw, bh = (float(v) for v in a["bbox"])
                t = COCO_TOLERANCE_PX
                if bw < 0 or bh < 0 or x < -t or y < -t or x + bw > w + t or y + bh > h + t:
                    raise DataError(f"data {where}: annotation {aid} ({key}) has bbox [{x:g}, {y:g}, {bw:g}, {bh:g}] "
                                    f"outside the {w:g}x{h:g} image; COCO boxes are [x, y, width, height] in "
                                    "pixels: fix or clip it")
                boxes[a["image_id"]].append((x, y, x + bw, y + bh, index[c]))
                if self.masks:
                    shapes[a["image_id"]].append(coco_shape(a.get("segmentation"), w, h,
                                                            f"{where} annotation {aid} ({key})"))
            del doc
            keys, labels = [], np.empty(len(info), dtype=object)
            for n, (img_id, (key, w, h)) in enumerate(info.items()):
                b = np.asarray(boxes[img_id], np.float64).reshape(-1, 5)
                labels[n] = (int(round(w)), int(round(h)), b[:, 4].astype(np.int64), shapes[img_id]) if self.masks \
                    else self._labels_in_input_pixels(b[:, :4], b[:, 4].astype(np.int64), w, h)
                keys.append(key)
            if self.masks:
                labels = LazyInstances(list(labels), self.preprocess)
            parts[f"x_{split}"] = self._lazy(files, keys, [listing[k] for k in keys], split)
            parts[f"y_{split}"] = labels
        return Splits(**parts, source=files.root)
