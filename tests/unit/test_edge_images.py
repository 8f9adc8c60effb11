"""The edge pyfunc takes raw images: the preprocessing the recipe declared runs inside it, and a
detector's boxes come back in each source image's pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import DataError, SourceError
from edgeslim.components.common.image_preprocess import (ImagePreprocessConfig, images_to_inputs,
                                                         preprocess_image)
from edgeslim.components.common.stage_configs import OnnxExportConfig
from edgeslim.components.export import export
from edgeslim.plugins import edge_flavor as flavor

PRE = {"resize": 40, "center_crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class ColourNet(nn.Module):
    """A classifier over 3x32x32 inputs that is sensitive to colour and position."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 5, stride=2)
        self.fc = nn.Linear(6 * 14 * 14, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def edge_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge-images")
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    y = np.zeros(8, np.int64)
    model = ColourNet().eval()
    onnx = export(model, OnnxExportConfig(), data=Splits(x, y, x, y, x, y), out_path=tmp / "m.onnx").model
    with_pre = flavor.save_model(tmp / "with", onnx, metadata={"preprocess": PRE})
    without = flavor.save_model(tmp / "without", onnx, metadata={})
    return model, with_pre, without


def test_raw_images_go_through_the_recorded_preprocessing(edge_dirs):
    model, path, _ = edge_dirs
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)]
    edge = flavor.EdgeModel(path)
    by_bytes = edge.predict({"images": [_png(p) for p in photos]})
    by_array = edge.predict({"images": photos})
    by_frame = edge.predict(pd.DataFrame({"image": [_png(p) for p in photos]}))
    by_base64 = edge.predict({"images": [base64.b64encode(_png(p)).decode() for p in photos]})
    cfg = ImagePreprocessConfig.from_dict(PRE)
    x = np.stack([preprocess_image(Image.fromarray(p), cfg) for p in photos])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    out = edge.session.get_outputs()[0].name
    for got in (by_bytes, by_array, by_frame, by_base64):
        np.testing.assert_allclose(got[out], want, atol=1e-4)
    # the same tensors given directly give the same answer: images are only a way in
    np.testing.assert_allclose(edge.predict(x)[out], want, atol=1e-4)


def test_images_for_a_model_without_preprocessing_or_of_the_wrong_kind_are_one_line(edge_dirs):
    _, path, without = edge_dirs
    photo = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(SourceError, match="records no data.preprocess") as err:
        flavor.EdgeModel(without).predict({"images": [photo]})
    assert "\n" not in str(err.value)
    edge = flavor.EdgeModel(path)
    with pytest.raises(DataError, match=r"images\[1\].*uint8"):
        edge.predict({"images": [photo, photo.astype(np.float32)]})
    with pytest.raises(DataError, match=r"images\[0\].*not a readable image"):
        edge.predict({"images": [b"not a png"]})
    with pytest.raises(DataError, match=r"images\[0\]: text that is not base64"):
        edge.predict({"images": ["not base64!"]})


def test_tensors_of_the_wrong_dtype_or_shape_are_one_line_naming_what_the_model_takes(edge_dirs):
    _, path, without = edge_dirs
    with pytest.raises(SourceError, match=r"got shape \(2, 3, 30, 30\); the model takes \(N, 3, 32, 32\), or "
                                          r"\{\"images\""):
        flavor.EdgeModel(path).predict(np.zeros((2, 3, 30, 30), np.float32))
    with pytest.raises(SourceError, match=r"got an array of object; give numbers, float32 of shape \(N, 3, 32, 32\)$"):
        flavor.EdgeModel(without).predict(np.array([[b"x"]], dtype=object))


@pytest.mark.parametrize("pre", [{"letterbox": 64}, {"resize": 48, "center_crop": 40}, {"resize": [30, 50]}])
def test_boxes_in_input_pixels_map_back_to_the_source_image(pre):
    cfg = ImagePreprocessConfig.from_dict(pre)
    src = np.array([[10, 12, 30, 40], [5, 20, 60, 33]], np.float32)
    _, geometries = images_to_inputs([np.zeros((50, 80, 3), np.uint8)], cfg)
    g = geometries[0]
    inp, keep = g.boxes(src)
    back = g.to_source(inp[keep])
    # A crop cuts boxes to the part of the source the input shows; that part maps back to where it
    # was in the source image (to a pixel's rounding).
    w, h = g.input_size
    seen = g.to_source(np.array([[0, 0, w, h]], np.float32))[0]
    want = src[keep].copy()
    want[:, [0, 1]] = np.maximum(want[:, [0, 1]], seen[[0, 1]])
    want[:, [2, 3]] = np.minimum(want[:, [2, 3]], seen[[2, 3]])
    np.testing.assert_allclose(back, want, atol=1.5)
    assert keep.all() or "center_crop" in pre
