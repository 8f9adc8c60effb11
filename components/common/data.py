"""Dataset splits and the checks every provider's output goes through."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any, Callable

import numpy as np

from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.registry import Registry

SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
# Rows that stand for a set of samples where MLflow demands an array (a dataset's profile and schema, a
# model's input example): memory stays that of a few rows, whatever the set's size; lineage says so.
PROFILE_ROWS = 8


def is_lazy(x) -> bool:
    """Whether ``x`` is an array-like read on demand (e.g. :class:`~.lazy_images.LazyImages`) rather
    than a numpy array: it has ``len``, ``shape``, ``dtype`` and indexing, and is kept as it is."""
    return (not isinstance(x, np.ndarray) and not hasattr(x, "numpy")  # a torch tensor is not lazy
            and all(hasattr(x, a) for a in ("__getitem__", "__len__", "shape", "dtype")))


class DeferredLabels:
    """One split's labels, read the first time anything but their number is asked of them.

    A provider whose labels lie in a file per image (YOLO's) gives these instead of the labels: a task that
    never reads a split's labels never opens its files (export and calibration read images alone; the
    evaluation reads the test split's, the detector search the validation split's). Indexing, iterating,
    ``np.asarray`` and the array's own methods read them (once, then kept: they are small beside the
    images) and answer as the labels would; a bad label file is refused there, in one line, as the
    provider refuses it. :meth:`Splits.read_labels` reads every split's at once.

    Args:
        n: the split's images (one label each).
        read: reads the labels: ``n`` of them, as an array (or lazy array-like) the provider would give.
        where: the split, for messages.
    """

    dtype = np.dtype(object)
    ndim = 1

    def __init__(self, n: int, read: Callable[[], Any], where: str = ""):
        self._n, self._read, self._where = int(n), read, where
        self._labels: Any = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int]:
        return (self._n,)

    def read(self) -> Any:
        """The labels, read on the first call."""
        with self._lock:
            if self._labels is None:
                labels = self._read()
                if len(labels) != self._n:
                    raise DataError(f"data {self._where}: {self._n} images but {len(labels)} labels; they must "
                                    "pair up")
                self._labels = labels
            return self._labels

    def __getitem__(self, key: Any) -> Any:
        return self.read()[key]

    def __iter__(self):
        return iter(self.read())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        labels = np.asarray(self.read())
        return labels if dtype is None else labels.astype(dtype)

    def __getattr__(self, name: str) -> Any:
        # an array's public attributes (tolist, size, ...) read the labels; any other name is absent without
        # reading them (``hasattr(y, "numpy")`` and the like ask what kind of thing this is)
        if name.startswith("_") or not hasattr(np.ndarray, name):
            raise AttributeError(name)
        return getattr(self.read(), name)

    def digest(self) -> str:
        """sha256 of the labels (read for it)."""
        labels = self.read()
        if hasattr(labels, "digest"):
            return labels.digest()
        h = hashlib.sha256()
        for item in labels:
            h.update(np.ascontiguousarray(item).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"DeferredLabels({self._n} labels of {self._where or 'a split'}, " \
               f"{'read' if self._labels is not None else 'not read yet'})"

    def __getstate__(self) -> dict:  # a copy for another process carries the labels, not the reader
        return {"_n": self._n, "_where": self._where, "_labels": self.read()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _read=None, _lock=threading.Lock())


def check_labels(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if len(x) != len(y):
        raise DataError(f"data {where}: {len(x)} inputs but {len(y)} labels; they must pair up")


@dataclasses.dataclass
class Splits:
    """Train/validation/test arrays. Calibration only ever draws from train.

    ``x_*`` are float32 numpy arrays, or lazy array-likes (:func:`is_lazy`, e.g. an image
    provider's :class:`~edgeslim.components.common.lazy_images.LazyImages`) that decode the rows
    asked for: stages index and slice them in batches and never hold a whole split.
    ``y_*`` are in memory (class indices, or per-image (k, 5) boxes), or lazy like ``x_*`` where a label
    is pixels (class maps, or instance stacks drawn from outlines), or :class:`DeferredLabels` (read from
    their files when first asked for).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        for k in ("x_train", "x_val", "x_test"):
            arr = getattr(self, k)
            if is_lazy(arr):
                if np.dtype(arr.dtype) != np.float32:
                    raise DataError(f"data {self.source}: {k} reads as {arr.dtype}; a lazy split must give float32 rows")
                continue
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                setattr(self, k, np.asarray(arr, dtype=np.float32))
        for split in ("train", "val", "test"):
            check_labels(getattr(self, f"x_{split}"), getattr(self, f"y_{split}"), split)
            if len(getattr(self, f"x_{split}")) == 0:
                raise DataError(f"data {self.source}: the {split} split is empty; it needs samples")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def read_labels(self) -> None:
        """Read every split's labels now where a provider defers them (:class:`DeferredLabels`), so that a
        bad label file is refused here, in one line, before any task runs."""
        for split in ("train", "val", "test"):
            y = getattr(self, f"y_{split}")
            if isinstance(y, DeferredLabels):
                y.read()

    def calibration(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` samples from the train split (all of it when ``n`` is larger), drawn with ``seed``.
        Only the drawn rows are read: a lazy split decodes ``n`` images, whatever its size."""
        return self.x_train[self.calibration_rows(n, seed)]

    def calibration_rows(self, n: int, seed: int = 0) -> np.ndarray:
        """The train rows :meth:`calibration` draws, in order (to read them a batch at a time)."""
        n = min(n, len(self.x_train))
        return np.sort(np.random.default_rng(seed).choice(len(self.x_train), size=n, replace=False))

    def calibration_profile(self, n: int, seed: int = 0, rows: int = PROFILE_ROWS) -> tuple[np.ndarray, dict]:
        """The first ``rows`` of the ``n`` calibration samples (:meth:`calibration`), to stand for them where
        an array is demanded, and the lineage that says so: ``samples`` (how many calibrated),
        ``profiled_rows`` (how many the array holds) and ``digest`` (of all ``n`` rows; a lazy split's is
        of their files, sizes and preprocessing, so no image is read for it). Only ``rows`` rows are read."""
        idx = self.calibration_rows(n, seed)
        x = self.x_train
        if is_lazy(x) and hasattr(x, "subset"):
            digest = x.subset(idx).digest()
        else:
            h = hashlib.sha256()
            for i in range(0, len(idx), 256):
                h.update(np.ascontiguousarray(x[idx[i:i + 256]]).tobytes())
            digest = h.hexdigest()
        sample = np.ascontiguousarray(x[idx[:rows]])
        return sample, {"samples": int(len(idx)), "profiled_rows": int(len(sample)), "digest": digest}

    def digest(self) -> str:
        h = hashlib.sha256()
        for k in SPLIT_KEYS:
            a = getattr(self, k)
            h.update(k.encode())
            if is_lazy(a):
                # what the rows are made from (file names, sizes, preprocessing), never the pixels
                h.update(a.digest().encode() if hasattr(a, "digest") else _streamed_digest(a).encode())
            elif a.dtype != object:
                h.update(np.ascontiguousarray(a).tobytes())
            else:
                for item in a:
                    h.update(np.ascontiguousarray(item).tobytes())
        return h.hexdigest()


def _streamed_digest(x, batch: int = 256) -> str:
    """sha256 of a lazy array without a ``digest()`` of its own, read a batch at a time."""
    h = hashlib.sha256()
    for i in range(0, len(x), batch):
        h.update(np.ascontiguousarray(x[i:i + batch]).tobytes())
    return h.hexdigest()


# Every data provider, by the name a recipe's ``data.provider`` gives: the entry-point group
# ``edgeslim.datasets`` (the built-ins' are in edgeslim's own pyproject.toml).
PROVIDERS: Registry = Registry("edgeslim.datasets", "provider", where="data.provider")


def provider_class(name: str):
    """The data provider registered as ``name`` in :data:`PROVIDERS`.

    Raises:
        ConfigError: no provider is registered as ``name`` (one line with the closest name and the known ones).
    """
    return PROVIDERS.get(name)


def _provider(provider: str, args: dict | None, preprocess=None):
    """The provider built with ``args``, and ``preprocess=`` when the recipe declares one."""
    import inspect

    from edgeslim.components.common.image_preprocess import ImagePreprocessConfig

    cls = provider_class(provider)
    kwargs = dict(args or {})
    if preprocess is not None:
        if "preprocess" in kwargs:
            raise ConfigError("data.args.preprocess: declare preprocessing once, as data.preprocess")
        try:
            takes = "preprocess" in inspect.signature(cls).parameters
        except (TypeError, ValueError):
            takes = False
        if not takes:
            raise ConfigError(f"data.preprocess: the {provider} provider gives model inputs as they are and takes "
                              "no preprocessing; remove data.preprocess, or use an image provider "
                              "(imagefolder, yolo, coco)")
        if isinstance(preprocess, dict):
            preprocess = ImagePreprocessConfig.from_dict(preprocess, prefix="data.preprocess")
        kwargs["preprocess"] = preprocess
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"data.args: {exc}; check the provider's arguments") from None


def load_data(provider: str, args: dict | None = None, preprocess=None) -> Splits:
    """Build the provider with ``args`` (and the recipe's ``data.preprocess``) and load its splits.

    Raises:
        ConfigError: unknown provider, wrong arguments, or preprocessing for a provider that takes none.
        DataError: the provider's data cannot be read or is wrong (one line naming the file and the fix).
    """
    return _provider(provider, args, preprocess).load()


def describe_data(provider: str, args: dict | None = None, preprocess=None) -> dict:
    """What the provider says of its data (for lineage), or its name and arguments."""
    inst = _provider(provider, args, preprocess)
    return inst.describe() if hasattr(inst, "describe") else {"provider": provider, **(args or {})}
