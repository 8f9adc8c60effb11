"""Small image datasets written with Pillow, for the image provider tests (unit and S3).

- :func:`write_imagefolder`: scikit-learn's digits upscaled to 32x32 RGB PNGs in class folders.
- :func:`write_detection`: coloured rectangles on 40x30 canvases, labelled both as an Ultralytics
  dataset (``data.yaml``, ``images/<split>``, ``labels/<split>``) and as COCO instances JSONs
  (``annotations/instances_<split>.json``) over the same image files.
- :func:`write_segmentation`: the same rectangles labelled with outlines: Ultralytics polygon
  lines, and COCO polygons, uncompressed RLE and compressed RLE (:func:`rle_string`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
DET_SIZE = (40, 30)  # width, height: not square, so letterbox pads
DET_COLOURS = [(230, 40, 40), (40, 200, 40), (40, 40, 230)]


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 32, 32, 3) uint8 RGB (nearest upscaling, a colour per stroke) and targets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    a = (d.images / 16.0 * 255).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    rgb = np.stack([a, 255 - a, (a // 2 + 64).astype(np.uint8)], -1)
    return rgb, d.target.astype(np.int64)


def write_imagefolder(root: Path, *, layout: str = "splits", counts=(300, 60, 60), fmt: str = "png",
                      classes: int = 10) -> dict:
    """Digits as ``root/{train,val,test}/<class>/NNNN.png`` (``layout="splits"``) or
    ``root/<class>/NNNN.png`` (``"flat"``, every image). Returns ``{split or "all": [(path, label)]}``."""
    from PIL import Image

    images, targets = digit_images()
    keep = targets < classes
    images, targets = images[keep], targets[keep]
    out: dict[str, list] = {}
    if layout == "flat":
        parts = {"all": (0, len(images))}
    else:
        edges = np.cumsum((0, *counts))
        parts = {s: (int(edges[i]), int(edges[i + 1])) for i, s in enumerate(SPLITS)}
    for split, (a, b) in parts.items():
        rows = []
        for i in range(a, b):
            folder = root / (f"digit{targets[i]}" if layout == "flat" else f"{split}/digit{targets[i]}")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:04d}.{fmt}"
            Image.fromarray(images[i]).save(path, quality=95) if fmt == "jpg" else Image.fromarray(images[i]).save(path)
            rows.append((path, int(targets[i])))
        out[split] = rows
    return out


def write_detection(root: Path, counts=(24, 8, 8), seed: int = 0) -> dict:
    """Rectangles on grey 40x30 canvases, as a YOLO dataset and as COCO JSONs over the same images.

    Returns:
        ``{split: [(image path, (k, 5) source-pixel boxes [x1, y1, x2, y2, class])]}``.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = DET_SIZE
    out: dict[str, list] = {}
    categories = [{"id": 10 + c, "name": f"shape{c}"} for c in range(len(DET_COLOURS))]
    ann_id = 1
    for split, n in zip(SPLITS, counts):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": categories}
        rows = []
        for i in range(n):
            im = Image.new("RGB", DET_SIZE, (128, 128, 128))
            draw = ImageDraw.Draw(im)
            boxes = []
            for _ in range(int(rng.integers(0, 3)) if i else 2):  # image 0 always has objects
                bw, bh = int(rng.integers(6, 15)), int(rng.integers(6, 12))
                x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                c = int(rng.integers(0, len(DET_COLOURS)))
                draw.rectangle([x1, y1, x1 + bw - 1, y1 + bh - 1], fill=DET_COLOURS[c])
                boxes.append([x1, y1, x1 + bw, y1 + bh, c])
            name = f"{split}_{i:03d}.png"
            path = root / "images" / split / name
            im.save(path)
            b = np.asarray(boxes, np.float64).reshape(-1, 5)
            if len(b) or i % 2:  # some images without objects have no label file at all
                (root / "labels" / split / f"{split}_{i:03d}.txt").write_text("".join(
                    f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
                    for x1, y1, x2, y2, c in b))
            coco["images"].append({"id": 1000 + i, "file_name": name, "width": w, "height": h})
            for x1, y1, x2, y2, c in b:
                coco["annotations"].append({"id": ann_id, "image_id": 1000 + i, "category_id": 10 + int(c),
                                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                            "iscrowd": 0})
                ann_id += 1
            rows.append((path, b))
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        out[split] = rows
    (root / "data.yaml").write_text(
        "train: images/train\nval: images/val\ntest: images/test\n"
        "names:\n" + "".join(f"  {c}: shape{c}\n" for c in range(len(DET_COLOURS))))
    return out


def rle_string(counts) -> str:
    """COCO's compressed RLE string of run lengths (the encoding pycocotools writes)."""
    out = []
    for i, x in enumerate(int(c) for c in counts):
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rle_of(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a bool mask, zeros first (COCO's uncompressed RLE counts)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] if flat[0] else []) + runs


def write_segmentation(root: Path, counts=(6, 4, 4), seed: int = 1) -> dict:
    """:func:`write_detection`'s rectangles with outlines: YOLO polygon labels, and COCO annotations whose
    segmentation cycles through polygons, uncompressed RLE and compressed RLE.

    Returns:
        ``{split: [(image path, (k, h, w) bool source-pixel masks, (k,) classes)]}``.
    """
    det = write_detection(root, counts, seed)
    w, h = DET_SIZE
    out: dict[str, list] = {}
    n_ann = 0
    for split, rows in det.items():
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        anns = iter(coco["annotations"])
        out[split] = []
        for path, b in rows:
            masks = np.zeros((len(b), h, w), bool)
            lines = []
            for j, (x1, y1, x2, y2, c) in enumerate(b):
                masks[j, int(y1):int(y2), int(x1):int(x2)] = True
                poly = [x1, y1, x2, y1, x2, y2, x1, y2]
                lines.append(f"{int(c)} " + " ".join(f"{v / (w if k % 2 == 0 else h):.6f}"
                                                     for k, v in enumerate(poly)) + "\n")
                a = next(anns)
                kind = n_ann % 3
                a["segmentation"] = [poly] if kind == 0 else {"size": [h, w], "counts": (
                    rle_of(masks[j]) if kind == 1 else rle_string(rle_of(masks[j])))}
                n_ann += 1
            label = root / "labels" / split / (path.stem + ".txt")
            if lines or label.exists():
                label.write_text("".join(lines))
            out[split].append((path, masks, b[:, 4].astype(np.int64)))
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return out


def upload(local: Path, s3_url: str, endpoint_url: str) -> None:
    """Copy every file under ``local`` to ``s3_url`` (keys keep their relative paths)."""
    import boto3
    from botocore.config import Config

    bucket, _, prefix = s3_url[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                    response_checksum_validation="when_required"))
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local).as_posix()}".lstrip("/"),
                          Body=p.read_bytes())
