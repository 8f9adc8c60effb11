"""Image providers whose splits refuse to be held whole, to run the product on (``tests/entry_points.py``
installs this file as the module ``edgeslim_lazy_guard`` and its providers as ``guarded-imagefolder`` and
``guarded-yolo`` in the ``edgeslim.datasets`` group, for the processes a test starts).

Their splits are the real providers' :class:`~edgeslim.components.common.lazy_images.LazyImages`, except
that ``np.asarray`` of a split (``__array__``) and any read of more than :data:`MAX_ROWS` rows at once
raise :class:`WholeSplitRead`: every stage must stream a split a batch at a time. A test whose splits are
larger than :data:`MAX_ROWS` then fails wherever a stage holds a whole split.
"""

from __future__ import annotations

from edgeslim.components.common.lazy_images import LazyImages
from edgeslim.plugins.image_datasets import ImageFolder, YoloDataset

MAX_ROWS = 64  # the stages' batches (evaluation's, calibration's) are at most this many rows


class WholeSplitRead(AssertionError):
    """A stage asked for a whole split (or a large part of it) at once."""


class GuardedImages(LazyImages):
    def __array__(self, dtype=None, copy=None):
        raise WholeSplitRead(f"np.asarray of the whole {self.split} split ({len(self)} images): stream it in batches")

    def _rows(self, rows):
        if len(rows) > MAX_ROWS:
            raise WholeSplitRead(f"{len(rows)} rows of the {self.split} split ({len(self)} images) read at once; "
                                 f"a stage reads at most {MAX_ROWS}")
        return super()._rows(rows)


def _guarded(splits):
    for k in ("x_train", "x_val", "x_test"):
        x = getattr(splits, k)
        setattr(splits, k, GuardedImages(x.files, x.keys, x.preprocess, sizes=x.sizes, hw=x._hw, workers=x.workers,
                                         split=x.split))
    return splits


class GuardedImageFolder(ImageFolder):
    name = "guarded-imagefolder"

    def load(self):
        return _guarded(super().load())


class GuardedYolo(YoloDataset):
    name = "guarded-yolo"

    def load(self):
        return _guarded(super().load())
