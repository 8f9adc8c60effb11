"""A split of image files that reads like a float32 array and decodes only the rows asked for.

:class:`LazyImages` has ``len``, ``shape``, ``dtype`` and ``ndim``; indexing with an int, a
slice, an index array or a boolean mask returns a numpy array of those rows, read, decoded and
preprocessed (:mod:`.image_preprocess`) on demand on a small thread pool. Stage code that
slices (``x[i:i + 256]``), indexes (``x[idx]``) or takes ``len(x)`` works unchanged and touches
only those files, so memory follows the batch size, not the dataset. ``np.asarray(x)`` still
works (it decodes every row) but nothing in the stages calls it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
from typing import Any, Sequence

import numpy as np

from edgeslim.components.common.errors import DataError
from edgeslim.components.common.image_files import Files
from edgeslim.components.common.image_preprocess import ImagePreprocessConfig, open_image, preprocess_image

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="edgeslim-decode")
        return _POOLS[workers]


def default_workers() -> int:
    """Decode threads: Pillow releases the GIL while it decodes and resizes; S3 reads wait on the network."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


class LazyImages:
    """Image files of one split as a lazy ``(N, C, H, W)`` (or NHWC) float32 array.

    Args:
        files: where the images are.
        keys: the split's image keys under ``files``, in row order.
        preprocess: how a file becomes a row.
        sizes: file sizes in bytes (for :meth:`digest`), from the listing.
        hw: the rows' (height, width) when known; else the first image's, and every other
            image must match it.
        workers: decode threads (1: decode on the calling thread).
        split: the split's name, for messages.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, files: Files, keys: Sequence[str], preprocess: ImagePreprocessConfig, *,
                 sizes: Sequence[int] | None = None, hw: tuple[int, int] | None = None,
                 workers: int | None = None, split: str = ""):
        self.files, self.keys = files, list(keys)
        self.preprocess = preprocess
        self.sizes = np.asarray(sizes if sizes is not None else [-1] * len(self.keys), np.int64)
        self.workers = int(workers or default_workers())
        self.split = split
        self._hw = hw or preprocess.output_hw()

    # -- array protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, ...]:
        if self._hw is None:
            if not self.keys:
                return (0, *self.preprocess.sample_shape((0, 0)))
            first = self._decode(0)
            self._hw = (first.shape[1], first.shape[2]) if self.preprocess.layout == "NCHW" else first.shape[:2]
        return (len(self.keys), *self.preprocess.sample_shape(self._hw))

    @property
    def ndim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} images of {self.files.root}, split {self.split or '?'})"

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if key is Ellipsis:
            key = slice(None)
        n = len(self.keys)
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for a split of {n} images")
            row = self._rows([i % n])[0]
            return row[rest] if rest else row
        if isinstance(key, slice):
            rows = list(range(*key.indices(n)))
        else:
            idx = np.asarray(key.numpy() if hasattr(key, "numpy") else key)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"a boolean mask of shape {idx.shape} does not fit a split of {n} images")
                idx = np.flatnonzero(idx)
            elif idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise IndexError(f"images are indexed by ints, slices or int arrays; got {idx.dtype} indices")
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"index {int(idx.max() if idx.max() >= n else idx.min())} is out of bounds "
                                 f"for a split of {n} images")
            rows = list(idx % n) if n else []
        out = self._rows(rows)
        return out[(slice(None), *rest)] if rest else out

    def __iter__(self):
        for i in range(0, len(self), 64):
            yield from self[i:i + 64]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    # -- reading ---------------------------------------------------------------------------------
    def where(self, i: int) -> str:
        return self.files.url(self.keys[i])

    def _decode(self, i: int) -> np.ndarray:
        return preprocess_image(open_image(self.files.read(self.keys[i]), self.where(i)), self.preprocess)

    def _rows(self, rows: list[int]) -> np.ndarray:
        shape = self.shape[1:]
        out = np.empty((len(rows), *shape), np.float32)
        if not rows:
            return out
        first: dict[int, int] = {}  # row -> the first place it fills; a repeated row is copied from there
        for k, r in enumerate(rows):
            first.setdefault(r, k)

        def one(r: int) -> None:  # decoded straight into its place: no second copy of the batch
            x = self._decode(r)
            if x.shape != shape:
                hint = ("set data.preprocess.resize (or letterbox / center_crop) so that every image "
                        "comes out one size") if self.preprocess.output_hw() is None else \
                    "this is a bug in the preprocessing: report it"
                raise DataError(f"data {self.where(r)}: the image comes out as {list(x.shape)} but the "
                                f"{self.split or 'split'}'s images are {list(shape)}; {hint}")
            out[first[r]] = x

        if self.workers <= 1 or len(first) == 1:
            for r in first:
                one(r)
        else:
            list(_pool(self.workers).map(one, first))
        for k, r in enumerate(rows):
            if first[r] != k:
                out[k] = out[first[r]]
        return out

    def subset(self, rows: Sequence[int]) -> "LazyImages":
        """The rows ``rows`` as another lazy split (no file is read)."""
        rows = list(rows)
        return type(self)(self.files, [self.keys[r] for r in rows], self.preprocess, sizes=self.sizes[rows],
                          hw=self._hw, workers=self.workers, split=self.split)

    def digest(self) -> str:
        """sha256 of the file names, their sizes and the preprocessing: what the rows are made from.
        Pixels are not read (a dataset of 20,000 files digests in the time of one listing)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.preprocess.to_dict(), sort_keys=True).encode())
        for k, s in zip(self.keys, self.sizes.tolist()):
            h.update(f"{k}\0{s}\n".encode())
        return h.hexdigest()
