"""Image preprocessing, declared once in the recipe (``data.preprocess``) and applied the same way
wherever an image provider's images are read: calibration, evaluation, fine-tuning.

The steps, in order: decode (Pillow) and convert to RGB (or grey); ``resize`` (the shorter side to
an int, or exactly ``[h, w]``) or ``letterbox`` (fit inside ``[h, w]`` keeping the aspect ratio,
padded with ``pad_value``); ``center_crop``; to float32 divided by ``scale`` (0-1 for 8-bit images);
``channel_order``; ``(x - mean) / std`` per channel; ``layout``. The same geometry maps a detector's
boxes from the source image's pixels into the model input's (:meth:`Geometry.boxes`).
"""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import Literal

import numpy as np

from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError, DataError

Size = int | list[int] | None
# Pillow's resampling filters by name (Image.Resampling values, stable since Pillow 9.1).
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _hw(size: int | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclasses.dataclass(frozen=True)
class ImagePreprocessConfig(Config):
    """How an image becomes a model input (the recipe's ``data.preprocess``).

    Attributes:
        resize: an int resizes the shorter side to it (aspect kept, as torchvision's ``Resize(int)``);
            ``[h, w]`` resizes to exactly that. None keeps the source size.
        letterbox: ``[h, w]`` (or an int for a square): scale to fit inside, keeping the aspect
            ratio, and pad the rest with ``pad_value`` (Ultralytics' letterbox). Not with ``resize``.
        center_crop: ``[h, w]`` (or an int) cut from the centre after resizing.
        mean: per-channel mean subtracted after scaling (e.g. ImageNet's ``[0.485, 0.456, 0.406]``);
            empty: none.
        std: per-channel divisor after the mean; empty: none.
        channel_order: ``RGB``, ``BGR`` or ``GRAY`` (one channel).
        layout: ``NCHW`` (PyTorch) or ``NHWC``.
        dtype: the input's element type.
        scale: pixel values are divided by it first (255: 8-bit images to 0-1).
        interpolation: Pillow's resampling filter for resize and letterbox.
        pad_value: the letterbox padding, in 0-255 pixel units.
    """

    resize: Size = None
    letterbox: Size = None
    center_crop: Size = None
    mean: list[float] = dataclasses.field(default_factory=list)
    std: list[float] = dataclasses.field(default_factory=list)
    channel_order: Literal["RGB", "BGR", "GRAY"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    scale: float = 255.0
    interpolation: Literal["bilinear", "nearest", "bicubic", "lanczos", "box", "hamming"] = "bilinear"
    pad_value: int = 114

    def validate(self) -> None:
        for key in ("resize", "letterbox", "center_crop"):
            v = getattr(self, key)
            if v is None:
                continue
            ok = (isinstance(v, int) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(
                isinstance(s, int) and s > 0 for s in v))
            self.require(ok, key, "use a size in pixels (an int) or [height, width]", section="preprocess")
        if self.resize is not None and self.letterbox is not None:
            raise ConfigError("preprocess.letterbox: resize is set too; use one of resize or letterbox")
        for key in ("mean", "std"):
            v = getattr(self, key)
            self.require(len(v) in (0, 1, self.channels), key,
                         f"give {self.channels} values (one per {self.channel_order} channel), one, or none",
                         section="preprocess")
        self.require(all(s > 0 for s in self.std), "std", "every std must be > 0", section="preprocess")
        self.require(self.scale > 0, "scale", "use > 0 (255 maps 8-bit pixels to 0-1)", section="preprocess")
        self.require(0 <= self.pad_value <= 255, "pad_value", "use a pixel value in 0..255", section="preprocess")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "GRAY" else 3

    def output_hw(self) -> tuple[int, int] | None:
        """The input's (height, width) when every image comes out that size; None when it depends
        on the source image (no fixed size, or ``resize`` of the shorter side without a crop)."""
        if self.center_crop is not None:
            return _hw(self.center_crop)
        if self.letterbox is not None:
            return _hw(self.letterbox)
        if isinstance(self.resize, list):
            return _hw(self.resize)
        return None

    def sample_shape(self, hw: tuple[int, int]) -> tuple[int, int, int]:
        h, w = hw
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def boxes_need_source_size(self) -> bool:
        """Whether mapping normalised boxes into input pixels needs each source image's size
        (everything except an exact ``resize: [h, w]`` without a crop)."""
        return not (isinstance(self.resize, list) and self.center_crop is None)

    def geometry(self, width: int, height: int) -> "Geometry":
        """Where a ``width`` x ``height`` source image lands in the model input."""
        w, h = width, height
        if isinstance(self.resize, int):
            # torchvision's Resize(int): the shorter side to `resize`, the longer one truncated.
            short, long_ = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long_ / short)
            w, h = (new_short, new_long) if width <= height else (new_long, new_short)
        elif isinstance(self.resize, list):
            h, w = _hw(self.resize)
        pad = None
        canvas = (w, h)
        if self.letterbox is not None:
            th, tw = _hw(self.letterbox)
            r = min(th / height, tw / width)
            w, h = int(round(width * r)), int(round(height * r))
            # Ultralytics' rounding of the half paddings
            pad = (int(round((tw - w) / 2 - 0.1)), int(round((th - h) / 2 - 0.1)))
            canvas = (tw, th)
        crop = None
        if self.center_crop is not None:
            ch, cw = _hw(self.center_crop)
            # torchvision's CenterCrop offsets
            crop = (int(round((canvas[0] - cw) / 2.0)), int(round((canvas[1] - ch) / 2.0)), cw, ch)
        return Geometry(source=(width, height), resized=(w, h), pad=pad, canvas=canvas, crop=crop)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A source image's placement in the model input: resized to ``resized`` (w, h), pasted at
    ``pad`` (left, top) on a ``canvas`` (letterbox), then ``crop`` (left, top, w, h) cut out."""

    source: tuple[int, int]
    resized: tuple[int, int]
    pad: tuple[int, int] | None
    canvas: tuple[int, int]
    crop: tuple[int, int, int, int] | None

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the model input."""
        return (self.crop[2], self.crop[3]) if self.crop else self.canvas

    def _affine(self) -> tuple[float, float, int, int]:
        """Source pixels to input pixels: x * sx + ox, y * sy + oy."""
        sx, sy = self.resized[0] / self.source[0], self.resized[1] / self.source[1]
        ox = (self.pad[0] if self.pad else 0) - (self.crop[0] if self.crop else 0)
        oy = (self.pad[1] if self.pad else 0) - (self.crop[1] if self.crop else 0)
        return sx, sy, ox, oy

    def boxes(self, xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source-pixel ``[x1, y1, x2, y2]`` boxes in input pixels, clipped to the input, and the
        mask of the boxes that keep an area (a crop can cut a box away)."""
        sx, sy, ox, oy = self._affine()
        width, height = self.input_size
        b = np.asarray(xyxy, np.float64).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] * sx + ox).clip(0, width)
        b[:, [1, 3]] = (b[:, [1, 3]] * sy + oy).clip(0, height)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        return b.astype(np.float32), keep

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Source-pixel ``(n, 2)`` points (e.g. a polygon's) in input pixels, unclipped."""
        sx, sy, ox, oy = self._affine()
        p = np.asarray(xy, np.float64).reshape(-1, 2)
        return np.stack([p[:, 0] * sx + ox, p[:, 1] * sy + oy], 1)

    def to_source(self, xyxy: np.ndarray) -> np.ndarray:
        """Input-pixel ``[x1, y1, x2, y2]`` boxes (e.g. a detector's) in the source image's pixels,
        clipped to it: the inverse of :meth:`boxes`."""
        sx, sy, ox, oy = self._affine()
        b = np.asarray(xyxy, np.float64).reshape(-1, 4).copy()
        b[:, [0, 2]] = ((b[:, [0, 2]] - ox) / sx).clip(0, self.source[0])
        b[:, [1, 3]] = ((b[:, [1, 3]] - oy) / sy).clip(0, self.source[1])
        return b.astype(np.float32)


def open_image(blob: bytes, where: str):
    """The decoded Pillow image of ``blob`` (fully loaded).

    Raises:
        DataError: not an image Pillow can read, or truncated (one line naming ``where``).
    """
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(blob))
        im.load()
    except Exception as exc:  # Pillow and its plugins (another library may register a HEIF opener) raise anything
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DataError(f"data {where}: not a readable image ({why}); replace the file with a valid "
                        "JPEG/PNG or delete it") from None
    return im


def image_size(blob: bytes, where: str) -> tuple[int, int]:
    """(width, height) from an image's header (``blob`` may be only its first bytes)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.size
    except Exception as exc:  # as open_image: any plugin's failure is an unreadable image
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DataError(f"data {where}: not a readable image ({why}); replace the file with a valid "
                        "JPEG/PNG or delete it") from None


def images_to_inputs(images, config: ImagePreprocessConfig) -> tuple[np.ndarray, list[Geometry]]:
    """Images as given to a served model (encoded JPEG/PNG bytes, the same as base64 text, which is
    how JSON carries them, ``(H, W[, C])`` uint8 arrays or Pillow images) as one model-input batch,
    with each image's :class:`Geometry`.

    Raises:
        DataError: an item that is none of those, or bytes that are not a readable image.
    """
    from PIL import Image

    batch, geometries = [], []
    for i, item in enumerate(images):
        where = f"images[{i}]"
        if isinstance(item, str):
            try:
                item = base64.b64decode(item, validate=True)
            except ValueError:
                raise DataError(f"data {where}: text that is not base64; give encoded image bytes, or their "
                                "base64 text in JSON") from None
        if isinstance(item, (bytes, bytearray, memoryview)):
            im = open_image(bytes(item), where)
        elif isinstance(item, Image.Image):
            im = item
        else:
            arr = np.asarray(item)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
                raise DataError(f"data {where}: got an array of {arr.dtype} {arr.shape}; give encoded image bytes "
                                "or an (H, W, 3) uint8 RGB array")
            im = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        geometries.append(config.geometry(*im.size))
        batch.append(preprocess_image(im, config))
    if not batch:
        raise DataError("data images: the list is empty; give at least one image")
    shapes = {x.shape for x in batch}
    if len(shapes) > 1:
        raise DataError(f"data images: they preprocess to different shapes {sorted(shapes)}; the recorded "
                        "preprocessing needs a fixed size (center_crop, letterbox or resize: [h, w]) to batch them")
    return np.stack(batch), geometries


def preprocess_image(im, config: ImagePreprocessConfig) -> np.ndarray:
    """A Pillow image as one model input (``config.sample_shape``), float32."""
    from PIL import Image

    im = im.convert("L" if config.channel_order == "GRAY" else "RGB")
    g = config.geometry(*im.size)
    if g.resized != im.size:
        im = im.resize(g.resized, resample=_RESAMPLE[config.interpolation])
    if g.pad is not None:
        fill = config.pad_value if im.mode == "L" else (config.pad_value,) * 3
        canvas = Image.new(im.mode, g.canvas, fill)
        canvas.paste(im, g.pad)
        im = canvas
    if g.crop is not None:
        left, top, cw, ch = g.crop
        im = im.crop((left, top, left + cw, top + ch))  # outside the image: zeros, as torchvision pads
    x = np.asarray(im, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if config.scale != 1.0:
        x = x / np.float32(config.scale)
    if config.channel_order == "BGR":
        x = x[:, :, ::-1]
    if config.mean:
        x = x - np.asarray(config.mean, np.float32)
    if config.std:
        x = x / np.asarray(config.std, np.float32)
    if config.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)

