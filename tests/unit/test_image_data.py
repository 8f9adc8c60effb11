"""Image providers (imagefolder, yolo, coco): rows decoded on demand equal a direct decode and
preprocess, only the touched files are read, bad data is one line naming the file, and the
classification path runs end to end on a lazy split without ever holding one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgeslim.components.common.data import Splits, load_data
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.common.image_files import LocalFiles
from edgeslim.components.common.image_preprocess import ImagePreprocessConfig
from edgeslim.components.common.lazy_images import LazyImages
from tests.image_datasets import DET_SIZE, write_detection, write_imagefolder

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    return root, write_imagefolder(root, counts=(40, 10, 10))


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection")
    return root, write_detection(root)


@pytest.fixture
def reads(monkeypatch):
    """Every file read (whole, or only its head) during the test, in order."""
    seen: list[tuple[str, str]] = []
    read, head = LocalFiles.read, LocalFiles.read_head

    def counted(self, key):
        seen.append(("read", key))
        return read(self, key)

    def counted_head(self, key, n=65536):
        seen.append(("head", key))
        return head(self, key, n)

    monkeypatch.setattr(LocalFiles, "read", counted)
    monkeypatch.setattr(LocalFiles, "read_head", counted_head)
    return seen


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------- values

def direct(path, size_hw, crop_hw=None, bgr=False):
    """The reference: Pillow decode, bilinear resize, centre crop, /255, channel order, mean/std, CHW."""
    im = Image.open(path).convert("RGB").resize(size_hw[::-1], Image.BILINEAR)
    if crop_hw:
        left, top = (size_hw[1] - crop_hw[1]) // 2, (size_hw[0] - crop_hw[0]) // 2
        im = im.crop((left, top, left + crop_hw[1], top + crop_hw[0]))
    x = np.asarray(im, np.float32) / 255.0
    x = x[:, :, ::-1] if bgr else x
    mean, std = (MEAN[::-1], STD[::-1]) if bgr else (MEAN, STD)
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


def test_imagefolder_rows_equal_a_direct_decode_and_preprocess(folder):
    root, files = folder
    pre = {"resize": 24, "center_crop": 20, "mean": MEAN, "std": STD, "channel_order": "BGR"}
    data = load_data("imagefolder", {"root": str(root)}, pre)
    assert isinstance(data.x_train, LazyImages) and data.x_train.dtype == np.float32
    assert data.x_train.shape == (40, 3, 20, 20) and data.input_shape == (3, 20, 20)
    want_val = sorted(files["val"], key=lambda r: str(r[0].relative_to(root)))
    np.testing.assert_array_equal(data.y_val, [c for _, c in want_val])
    # mean/std are given in RGB order and apply to the channels as they come out (BGR here)
    pre_rgb_stats = ImagePreprocessConfig.from_dict({**pre, "mean": MEAN[::-1], "std": STD[::-1]})
    lazy = LazyImages(LocalFiles(root), [str(p.relative_to(root)) for p, _ in want_val], pre_rgb_stats)
    for i in (0, 3, 9):
        np.testing.assert_allclose(lazy[i], direct(want_val[i][0], (24, 24), (20, 20), bgr=True), atol=1e-5)
    # every way of indexing gives the same rows
    x = data.x_val
    full = np.stack([x[i] for i in range(len(x))])
    np.testing.assert_array_equal(x[2:7], full[2:7])
    np.testing.assert_array_equal(x[::3], full[::3])
    np.testing.assert_array_equal(x[np.array([7, 1, 7])], full[[7, 1, 7]])
    np.testing.assert_array_equal(x[np.arange(10) % 2 == 0], full[::2])
    np.testing.assert_array_equal(x[-1], full[-1])
    np.testing.assert_array_equal(x[[1, 2], 0], full[[1, 2], 0])
    np.testing.assert_array_equal(x[torch.tensor([4, 5])], full[[4, 5]])
    np.testing.assert_array_equal(np.asarray(x), full)
    with pytest.raises(IndexError, match="out of bounds"):
        x[10]
    with pytest.raises(IndexError, match="out of bounds"):
        x[np.array([0, 12])]


def test_only_the_touched_files_are_read(folder, reads):
    root, _ = folder
    data = load_data("imagefolder", {"root": str(root)}, {"resize": [16, 16]})
    assert reads == []  # listing gives names and sizes; no image is opened to load
    digest = data.digest()
    assert reads == []  # nor to digest: names, sizes and the preprocessing
    data.x_val[2:5]
    assert reads == [("read", k) for k in data.x_val.keys[2:5]]
    reads.clear()
    calib = data.calibration(8, seed=3)
    assert calib.shape == (8, 3, 16, 16) and len(reads) == 8
    assert {k for _, k in reads} <= set(data.x_train.keys)
    again = load_data("imagefolder", {"root": str(root)}, {"resize": [16, 16]})
    assert again.digest() == digest
    assert load_data("imagefolder", {"root": str(root)}, {"resize": [16, 17]}).digest() != digest


def test_one_folder_is_split_by_fraction_deterministically(tmp_path):
    write_imagefolder(tmp_path, layout="flat", classes=3)
    args = {"root": str(tmp_path), "val_fraction": 0.2, "test_fraction": 0.25, "seed": 1}
    a, b = load_data("imagefolder", args), load_data("imagefolder", args)
    other = load_data("imagefolder", {**args, "seed": 2})
    keys = {s: getattr(a, f"x_{s}").keys for s in ("train", "val", "test")}
    assert keys == {s: getattr(b, f"x_{s}").keys for s in ("train", "val", "test")}
    assert keys["val"] != other.x_val.keys
    n = sum(len(k) for k in keys.values())
    assert len(set().union(*map(set, keys.values()))) == n  # disjoint, and together every image
    assert len(keys["test"]) == round(n * 0.25) and len(keys["val"]) == round(n * 0.2)
    assert set(a.y_train) == {0, 1, 2}
    np.testing.assert_array_equal(a.y_test, [int(k.split("/")[0][-1]) for k in keys["test"]])
    assert a.x_train.shape[1:] == (3, 32, 32)  # no resize: the images' own size


# --------------------------------------------------------------------------- detection labels

def letterboxed(path, size=32):
    w, h = DET_SIZE
    r = min(size / h, size / w)
    nw, nh = round(w * r), round(h * r)
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    canvas.paste(Image.open(path).convert("RGB").resize((nw, nh), Image.BILINEAR),
                 ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255.0


@pytest.mark.parametrize("provider", ["yolo", "coco"])
def test_detection_labels_follow_the_letterbox_into_input_pixels(detection, provider, reads):
    from edgeslim.components.tasks.detection.evaluate import detection_metrics
    from edgeslim.plugins.datasets import check_boxes

    root, truth = detection
    args = {"path": str(root / "data.yaml")} if provider == "yolo" else {"root": str(root)}
    data = load_data(provider, args, {"letterbox": 32})
    # coco takes the source size from its JSON; yolo reads only the image headers for the letterbox
    assert not [k for kind, k in reads if kind == "read" and k.endswith(".png")]
    if provider == "coco":
        assert not [k for kind, k in reads if kind == "head"]
    assert data.x_val.shape == (8, 3, 32, 32)
    # 40x30 -> scale 0.8 -> 32x24, 4 pixels of padding above and below
    for split in ("train", "val", "test"):
        y = getattr(data, f"y_{split}")
        assert y.dtype == object and len(y) == len(truth[split])
        for got, (_, src) in zip(y, truth[split]):
            assert got.dtype == np.float32 and got.shape == (len(src), 5)
            want = src.copy()
            want[:, :4] = want[:, :4] * 0.8 + [0, 4, 0, 4]
            np.testing.assert_allclose(got, want, atol=1e-3)
        check_boxes(getattr(data, f"x_{split}"), y, split)  # what the npz provider demands of boxes
    np.testing.assert_allclose(data.x_val[1], letterboxed(truth["val"][1][0]), atol=1e-5)
    perfect = [np.c_[b[:, :4], np.ones(len(b)), b[:, 4]] for b in data.y_val]
    assert detection_metrics(perfect, list(data.y_val), 3, 0.25)["map50"] == 100.0


def test_yolo_with_an_exact_resize_reads_no_image_to_load(detection, reads):
    root, truth = detection
    data = load_data("yolo", {"path": str(root / "data.yaml")}, {"resize": [24, 32]})
    assert not [k for _, k in reads if k.endswith(".png")]
    for got, (_, src) in zip(data.y_train, truth["train"]):
        np.testing.assert_allclose(got[:, :4], src[:, :4] * [32 / 40, 24 / 30, 32 / 40, 24 / 30], atol=1e-3)


# --------------------------------------------------------------------------- bad data: one line each

def test_an_unreadable_image_names_the_file_when_its_batch_is_read(folder, tmp_path):
    root, files = folder
    import shutil

    shutil.copytree(root, tmp_path / "d")
    bad = tmp_path / "d" / "train" / "digit3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good_jpg = tmp_path / "d" / "val" / "digit1" / "cut.jpg"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(good_jpg, quality=90)
    good_jpg.write_bytes(good_jpg.read_bytes()[:200])  # truncated
    data = load_data("imagefolder", {"root": str(tmp_path / "d")}, {"resize": [16, 16]})
    row = data.x_train.keys.index("train/digit3/broken.png")
    data.x_train[row + 1:]  # other batches are fine
    with pytest.raises(DataError) as exc:
        data.x_train[row - 1:row + 2]
    assert f"data {bad}: not a readable image" in one_line(exc) and "replace the file" in str(exc.value)
    with pytest.raises(DataError, match=r"cut\.jpg: not a readable image") as exc:
        data.x_val[:]
    one_line(exc)


def test_images_of_different_sizes_need_a_resize(tmp_path):
    for split in ("train", "val", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "0.png")
        Image.new("RGB", (9, 8)).save(tmp_path / split / "a" / "1.png")
    data = load_data("imagefolder", {"root": str(tmp_path)})
    with pytest.raises(DataError) as exc:
        data.x_train[:]
    assert "1.png: the image comes out as [3, 8, 9]" in one_line(exc) and "data.preprocess.resize" in str(exc.value)
    assert load_data("imagefolder", {"root": str(tmp_path)}, {"resize": [8, 8]}).x_train[:].shape == (2, 3, 8, 8)


def test_imagefolder_layout_errors(folder, tmp_path):
    import shutil

    root, _ = folder
    shutil.copytree(root, tmp_path / "d")
    some_class = sorted((root / "val").iterdir())[0]
    shutil.copytree(some_class, tmp_path / "d" / "val" / "zebra")
    with pytest.raises(DataError) as exc:
        load_data("imagefolder", {"root": str(tmp_path / "d")})
    assert "val/zebra: class folder 'zebra' of the val split is not one of the" in one_line(exc)
    shutil.rmtree(tmp_path / "d" / "val")
    (tmp_path / "d" / "val").mkdir()
    with pytest.raises(DataError) as exc:
        load_data("imagefolder", {"root": str(tmp_path / "d")})
    assert "the val split has no images in class folders" in one_line(exc)
    assert "split_dirs" in str(exc.value)
    # split_dirs maps a split to another folder
    ok = load_data("imagefolder", {"root": str(tmp_path / "d"), "split_dirs": {"val": "test"}})
    assert ok.x_val.keys == ok.x_test.keys
    with pytest.raises(DataError, match="no images"):
        load_data("imagefolder", {"root": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="data.args.root: required"):
        load_data("imagefolder", {})


def copy_detection(root, tmp_path):
    import shutil

    shutil.copytree(root, tmp_path / "d")
    return tmp_path / "d"


@pytest.mark.parametrize("line, want", [
    ("7 0.5 0.5 0.1 0.1", "line 1: class 7 is out of range; data.yaml names 3 classes (0..2)"),
    ("0 0.95 0.5 0.2 0.2", "line 1: box [0.85, 0.4, 1.05, 0.6] lies outside the image"),
    ("0 0.5 0.5", "line 1: 3 numbers; a YOLO label line is 'class cx cy w h'"),
    ("zero 0.5 0.5 0.1 0.1", "line 1: 'zero 0.5 0.5 0.1 0.1' is not numbers"),
])
def test_yolo_label_errors_name_the_file_and_line(detection, tmp_path, line, want):
    d = copy_detection(detection[0], tmp_path)
    (d / "labels" / "val" / "val_002.txt").write_text(line + "\n")
    data = load_data("yolo", {"path": str(d / "data.yaml")}, {"resize": [32, 32]})
    assert data.y_test[0].shape[1:] == (5,)  # the test split's labels read as they are
    with pytest.raises(DataError) as exc:
        data.y_val[0]  # the val split's labels are read when first asked for
    assert f"data {d / 'labels' / 'val' / 'val_002.txt'} {want}" in one_line(exc)
    with pytest.raises(DataError) as exc:  # as `edgeslim run` reads every split's before any task
        load_data("yolo", {"path": str(d / "data.yaml")}, {"resize": [32, 32]}).read_labels()
    assert f"data {d / 'labels' / 'val' / 'val_002.txt'} {want}" in one_line(exc)


def test_edgeslim_run_refuses_a_bad_label_of_any_split_before_any_task(detection, tmp_path, capsys):
    """A task reads only the labels it needs; `edgeslim run` reads every split's first, so a bad label file in
    a split that a later task would read is refused at once, in one line, before the model is even pulled."""
    import yaml

    from edgeslim.cli import main

    d = copy_detection(detection[0], tmp_path)
    (d / "labels" / "train" / "train_001.txt").write_text("0 0.5 0.5\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "source": "models:/never-pulled@champion",
        "data": {"provider": "yolo", "args": {"path": str(d / "data.yaml")}, "preprocess": {"resize": [32, 32]}},
        "task": {"kind": "detection", "num_classes": 3,
                 "decoder": {"heads": [{"box": "b", "cls": "c", "stride": 8}]}},
        "stages": [{"export": {}}, {"quantize": {"method": "ptq"}}],
        "register": {"name": "never-registered"}}))
    code = main(["run", str(recipe), "--tracking-uri", "http://127.0.0.1:9", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"data {d / 'labels' / 'train' / 'train_001.txt'} line 1: 3 numbers" in err
    assert not (tmp_path / "w" / "preflight").exists()  # refused before the model was pulled


@pytest.mark.parametrize("drop, want", [
    ("names", "no names: key; add e.g. 'names: {0: person, 1: car}'"),
    ("test", "no test: key (edgeslim's gate reads a held-out test split); add e.g. 'test: images/test'"),
])
def test_yolo_yaml_missing_a_key(detection, tmp_path, drop, want):
    import yaml

    d = copy_detection(detection[0], tmp_path)
    doc = yaml.safe_load((d / "data.yaml").read_text())
    doc.pop(drop)
    (d / "data.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(DataError) as exc:
        load_data("yolo", {"path": str(d / "data.yaml")})
    assert f"data {d / 'data.yaml'}: {want}" in one_line(exc)


def test_yolo_empty_split_and_missing_yaml(detection, tmp_path):
    import shutil

    d = copy_detection(detection[0], tmp_path)
    shutil.rmtree(d / "images" / "val")
    with pytest.raises(DataError) as exc:
        load_data("yolo", {"path": str(d / "data.yaml")})
    assert "val: images/val holds no images" in one_line(exc)
    with pytest.raises(DataError) as exc:
        load_data("yolo", {"path": str(d / "missing.yaml")})
    assert f"data {d / 'missing.yaml'}: cannot be read" in one_line(exc)


def test_coco_label_errors_name_the_annotation(detection, tmp_path):
    d = copy_detection(detection[0], tmp_path)
    path = d / "annotations" / "instances_val.json"
    original = json.loads(path.read_text())
    cases = [
        (lambda doc: doc["annotations"][0].update(category_id=99), "has category_id 99, not one of the categories"),
        (lambda doc: doc["annotations"][0].update(bbox=[30, 5, 15, 5]), "outside the 40x30 image"),
        (lambda doc: doc["images"].append({"id": 5, "file_name": "gone.png", "width": 40, "height": 30}),
         "gone.png: listed in"),
        (lambda doc: doc.update(images=[], annotations=[]), "the val split lists no images"),
        (lambda doc: doc.pop("categories"), "no 'categories' list"),
    ]
    for change, want in cases:
        doc = json.loads(json.dumps(original))
        change(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(DataError) as exc:
            load_data("coco", {"root": str(d)}, {"letterbox": 32})
        assert want in one_line(exc), want
    path.write_text("{not json")
    with pytest.raises(DataError, match="instances_val.json: not valid JSON"):
        load_data("coco", {"root": str(d)})


def test_preprocess_is_validated_and_only_for_image_providers(tmp_path):
    from edgeslim.components.recipe import DataConfig

    with pytest.raises(ConfigError) as exc:
        DataConfig.from_dict({"provider": "imagefolder", "preprocess": {"mean": [0.5, 0.5]}}, prefix="data")
    assert one_line(exc).startswith("data.preprocess.mean: got [0.5, 0.5]; give 3 values")
    with pytest.raises(ConfigError, match="^data.preprocess.letterbox: resize is set too"):
        DataConfig.from_dict({"preprocess": {"resize": 8, "letterbox": 8}}, prefix="data")
    with pytest.raises(ConfigError, match="^data.preprocess.layout: got 'CHW'; expected one of 'NCHW', 'NHWC'"):
        DataConfig.from_dict({"preprocess": {"layout": "CHW"}}, prefix="data")
    with pytest.raises(ConfigError, match="^data.preprocess.center_crop: got 0; use a size"):
        DataConfig.from_dict({"preprocess": {"center_crop": 0}}, prefix="data")
    # a recipe without preprocessing keeps its dict (and so its digest)
    assert "preprocess" not in DataConfig().to_dict()
    cfg = DataConfig.from_dict({"provider": "imagefolder", "preprocess": {"letterbox": [64, 96]}}, prefix="data")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as exc:
        load_data("sklearn-digits", {}, {"resize": 8})
    assert "data.preprocess: the sklearn-digits provider gives model inputs as they are" in one_line(exc)


def test_grayscale_nhwc_layout(folder):
    root, files = folder
    data = load_data("imagefolder", {"root": str(root)}, {"resize": [8, 8], "channel_order": "GRAY",
                                                          "layout": "NHWC", "scale": 1.0})
    assert data.x_test.shape == (10, 8, 8, 1)
    p = root / data.x_test.keys[0]
    want = np.asarray(Image.open(p).convert("L").resize((8, 8), Image.BILINEAR), np.float32)[:, :, None]
    np.testing.assert_array_equal(data.x_test[0], want)


# --------------------------------------------------------------------------- the classification path

class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_classification_path_runs_on_a_lazy_imagefolder_without_holding_a_split(tmp_path, monkeypatch):
    from edgeslim.components.common.stage_configs import LogitDistillConfig, OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.tasks.classification.evaluate import evaluate, gate
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.recipe import AccuracyGateConfig, EvaluateConfig
    from edgeslim.components.common.accuracy import top1
    from edgeslim.components.transform.stages import apply_torch_stages
    from edgeslim.components.transform.train import TrainConfig, fit

    write_imagefolder(tmp_path, layout="flat")
    data = load_data("imagefolder", {"root": str(tmp_path), "val_fraction": 0.1, "test_fraction": 0.2},
                     {"resize": [16, 16], "mean": [0.5], "std": [0.25]})
    assert len(data.x_train) > 1024  # larger than any batch the stages read at once

    def refuse(self, *a, **k):
        raise AssertionError("a stage turned a whole lazy split into an array")

    biggest = [0]
    rows = LazyImages._rows

    def counted(self, r):
        biggest[0] = max(biggest[0], len(r))
        return rows(self, r)

    monkeypatch.setattr(LazyImages, "__array__", refuse)
    monkeypatch.setattr(LazyImages, "_rows", counted)

    torch.manual_seed(0)
    teacher = fit(TinyNet(), TrainConfig(epochs=6, lr=1e-2, seed=0), x=data.x_train, y=data.y_train)
    assert top1(teacher, data.x_val, data.y_val) > 80.0
    student = apply_torch_stages(teacher, [LogitDistillConfig(epochs=1, student="previous")], data=data,
                                 teacher=teacher).model
    fp32 = export(student, OnnxExportConfig(), data=data, out_path=tmp_path / "m.onnx")
    q = quantize(fp32.model, PTQQuantizeConfig(num_samples=128), data=data, out_dir=tmp_path / "q")
    fast = EvaluateConfig(latency_batches=[1, 8], latency_warmup=1, latency_repeats=2)
    ev = evaluate(q.model, fast, parent_onnx=fp32.model, data=data).metrics
    assert ev["test_samples"] == len(data.x_test) and ev["candidate"]["metric"] > 75.0
    assert gate(ev, AccuracyGateConfig(max_metric_drop=5, min_top1_agreement=0.9, min_sqnr_db=5))["passed"]
    assert 0 < biggest[0] <= 1024 < len(data.x_train)

    # The same rows held in memory give the same ranges and the same evaluation.
    monkeypatch.undo()
    held = Splits(*(np.asarray(a) if isinstance(a, LazyImages) else a for a in
                    (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test)))
    q2 = quantize(fp32.model, PTQQuantizeConfig(num_samples=128), data=held, out_dir=tmp_path / "q2")
    assert q2.metrics["ranges"] == q.metrics["ranges"]
    ev2 = evaluate(q2.model, fast, parent_onnx=fp32.model, data=held).metrics
    assert ev2["candidate"]["metric"] == ev["candidate"]["metric"]
    assert ev2["candidate"]["fidelity"] == ev["candidate"]["fidelity"]


def test_detection_path_runs_on_a_lazy_yolo_dataset_as_on_held_arrays(detection, tmp_path, monkeypatch):
    from edgeslim.components.common.onnx_runtime import sqnr_db
    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.recipe import EvaluateConfig
    from edgeslim.components.reference.detector import DigitsDetector, default_heads, train_detector
    from edgeslim.components.tasks.detection.evaluate import check_detector, evaluate_detection, onnx_detections

    root, _ = detection
    data = load_data("yolo", {"path": str(root / "data.yaml")}, {"letterbox": 48, "channel_order": "GRAY"})
    task = task_from_dict({"kind": "detection", "num_classes": 3, "decoder": {"heads": default_heads()}})

    def refuse(self, *a, **k):
        raise AssertionError("a stage turned a whole lazy split into an array")

    monkeypatch.setattr(LazyImages, "__array__", refuse)
    torch.manual_seed(0)
    model = train_detector(DigitsDetector(width=4, head_hidden=4, num_classes=3), data.x_train, data.y_train,
                           epochs=1, batch_size=8)
    check_detector(model, data, task)
    fp32 = export(model, OnnxExportConfig(), data=data, out_path=tmp_path / "det.onnx").model
    q = quantize(fp32, PTQQuantizeConfig(num_samples=16), data=data, out_dir=tmp_path / "q").model
    fast = EvaluateConfig(latency_batches=[1], latency_warmup=1, latency_repeats=2)
    lazy = evaluate_detection(q, fast, parent_onnx=fp32, data=data, task=task).metrics
    monkeypatch.undo()
    held = Splits(*(np.asarray(a) if isinstance(a, LazyImages) else a for a in
                    (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test)))
    again = evaluate_detection(q, fast, parent_onnx=fp32, data=held, task=task).metrics
    for side in ("source", "candidate"):
        assert lazy[side]["detection"] == again[side]["detection"]
    assert lazy["candidate"]["fidelity"] == again["candidate"]["fidelity"]
    # the SQNR summed over batches is the SQNR of the held outputs
    _, ref, _ = onnx_detections(fp32, held.x_test, task)
    _, got, _ = onnx_detections(q, held.x_test, task)
    flat = [np.concatenate([o.reshape(len(o), -1) for o in outs], 1) for outs in (ref, got)]
    assert lazy["candidate"]["fidelity"]["sqnr_db"] == round(sqnr_db(*flat), 3)


@pytest.mark.slow
def test_the_data_scale_bench_measures_each_size_in_its_own_process(tmp_path):
    from edgeslim.pipelines.bench_data import data_scale_bench, format_bench

    res = data_scale_bench(sizes=(60, 200), workdir=tmp_path, calibration_samples=(8, 32), repeats=1)
    small, large = res["rows"]
    assert (small["images"], small["val_images"], large["images"], large["val_images"]) == (60, 6, 200, 20)
    for row in res["rows"]:
        assert row["calibrated_tensors"] > 0 and row["peak_rss_mb"] >= row["rss_after_imports_mb"] > 0
        assert row["eval_val_s"] >= 0 and row["calibration_s"] > 0
    assert res["peak_rss_ratio"] == round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    assert "peak RSS ratio" in format_bench(res)
    # calibration of 8 and 32 samples of the 60-image folder (48 train images), side by side
    few, more = res["calibration"]
    assert (few["samples"], more["samples"]) == (8, 32)
    for row in res["calibration"]:
        for cal in ("entropy", "minmax"):
            assert row[f"{cal}_s"] > 0 and row[f"{cal}_peak_rss_mb"] > 0
            assert row[f"{cal}_x_plain"] == round(row[f"{cal}_s"] / row["plain_pass_s"], 2)
    assert res["calibration_growth"]["entropy_s"] == round(more["entropy_s"] / few["entropy_s"], 2)
    assert "entropy_x_plain" in format_bench(res)
