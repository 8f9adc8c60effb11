"""The image providers on a real S3 server (Ceph RGW on loopback): the same splits, rows, labels and
digests as from the local copy, any endpoint (argument or environment), only the touched objects
read, and bad data one line naming the s3:// object."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.components.common.data import load_data
from edgeslim.components.common.errors import DataError
from edgeslim.components.common.image_files import S3Files
from tests.image_datasets import upload, write_detection, write_imagefolder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_imagefolder(root / "folder", counts=(30, 10, 10))
    write_detection(root / "det", counts=(10, 4, 4))
    return root


@pytest.fixture
def remote(local, rgw, s3_url):
    upload(local, s3_url, rgw["S3_ENDPOINT_URL"])
    return s3_url


@pytest.fixture
def gets(monkeypatch):
    seen: list[str] = []
    read = S3Files.read

    def counted(self, key):
        seen.append(key)
        return read(self, key)

    monkeypatch.setattr(S3Files, "read", counted)
    return seen


def same_splits(a, b, rows=(0, -1)):
    for split in ("train", "val", "test"):
        xa, xb = getattr(a, f"x_{split}"), getattr(b, f"x_{split}")
        assert xa.keys == xb.keys and xa.shape == xb.shape
        for r in rows:
            np.testing.assert_array_equal(xa[r], xb[r])
        ya, yb = getattr(a, f"y_{split}"), getattr(b, f"y_{split}")
        assert len(ya) == len(yb)
        for p, q in zip(ya, yb):
            np.testing.assert_array_equal(p, q)
    assert a.digest() == b.digest()  # names relative to the root, sizes, preprocessing: not where


def test_imagefolder_on_s3_streams_only_the_touched_objects(local, remote, rgw, gets):
    pre = {"resize": 20, "center_crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    s3 = load_data("imagefolder", {"root": f"{remote}/folder", "endpoint_url": rgw["S3_ENDPOINT_URL"]}, pre)
    assert gets == []  # a listing loads it
    s3.x_val[3:6]
    assert gets == s3.x_val.keys[3:6]
    gets.clear()
    assert s3.calibration(7, seed=1).shape == (7, 3, 16, 16) and len(gets) == 7
    same_splits(s3, load_data("imagefolder", {"root": str(local / "folder")}, pre))


@pytest.mark.parametrize("env", ["EDGESLIM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"])
def test_yolo_and_coco_on_s3_take_the_endpoint_from_the_environment(local, remote, rgw, monkeypatch, env):
    monkeypatch.delenv("EDGESLIM_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv(env, rgw["S3_ENDPOINT_URL"])
    pre = {"letterbox": 32}
    yolo = load_data("yolo", {"path": f"{remote}/det/data.yaml"}, pre)  # image headers by ranged GETs
    same_splits(yolo, load_data("yolo", {"path": str(local / "det" / "data.yaml")}, pre))
    coco = load_data("coco", {"root": f"{remote}/det"}, pre)
    same_splits(coco, load_data("coco", {"root": str(local / "det")}, pre))


def test_bad_data_on_s3_names_the_object(local, remote, rgw):
    import boto3
    from botocore.config import Config

    endpoint = rgw["S3_ENDPOINT_URL"]
    with pytest.raises(DataError) as exc:
        load_data("imagefolder", {"root": f"{remote}/nothing-here", "endpoint_url": endpoint})
    assert "\n" not in str(exc.value) and f"{remote}/nothing-here: no images" in str(exc.value)
    with pytest.raises(DataError) as exc:
        load_data("yolo", {"path": f"{remote}/det/missing.yaml", "endpoint_url": endpoint})
    assert f"data {remote}/det/missing.yaml at {endpoint}: cannot be read from S3" in str(exc.value)
    bucket, _, prefix = remote[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}))
    s3.put_object(Bucket=bucket, Key=f"{prefix}/folder/train/digit0/zz-broken.png", Body=b"not a png")
    data = load_data("imagefolder", {"root": f"{remote}/folder", "endpoint_url": endpoint}, {"resize": [8, 8]})
    with pytest.raises(DataError) as exc:
        data.x_train[:]
    assert f"data {remote}/folder/train/digit0/zz-broken.png: not a readable image" in str(exc.value)
