"""Reference data for segmentation, made on the spot: scenes of shapes with their class maps.

Each scene is a textured background with one to three shapes: class 1 rectangles, class 2 discs, class 3
triangles (class 0 is the background), each in a colour near its class's hue, so that a small model
learns them in a few epochs. :func:`shape_scenes` gives class maps; :func:`instance_scenes` one label per
shape (instance segmentation, the shapes' classes 0..2); :func:`write_mask_folders` writes class maps as the
``masks`` provider reads them (``<split>/images/*.png`` beside ``<split>/masks/*.png``). The tests and the
``lraspp`` and ``yolov8n-seg-trained`` benches build their data with them; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_CLASSES = 4
_HUES = np.array([[0.85, 0.25, 0.2], [0.2, 0.75, 0.3], [0.25, 0.35, 0.9]], np.float32)


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    img = (0.35 + 0.15 * rng.random((size, size, 1), dtype=np.float32)
           + 0.08 * rng.standard_normal((size, size, 3)).astype(np.float32))
    mask = np.zeros((size, size), np.uint8)
    shapes: list[tuple[int, np.ndarray]] = []
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, NUM_CLASSES))
        r = float(rng.uniform(0.12, 0.25)) * size
        cx, cy = rng.uniform(r, size - r, 2)
        if cls == 1:
            inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r * float(rng.uniform(0.5, 1.0)))
        elif cls == 2:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            inside = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        colour = _HUES[cls - 1] + rng.uniform(-0.12, 0.12, 3).astype(np.float32)
        img[inside] = colour + 0.05 * rng.standard_normal((int(inside.sum()), 3)).astype(np.float32)
        mask[inside] = cls
        shapes = [(c, m & ~inside) for c, m in shapes] + [(cls, inside)]  # a later shape hides what it covers
    return (img.clip(0, 1) * 255).astype(np.uint8), mask, [(c, m) for c, m in shapes if m.sum() >= 4]


def shape_scenes(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes: images ``(n, size, size, 3)`` uint8 and class maps ``(n, size, size)`` uint8."""
    rng = np.random.default_rng(seed)
    pairs = [_scene(rng, size) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def instance_scenes(n: int, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes with one label per shape: images ``(n, size, size, 3)`` uint8 and an object array of
    per-image ``(k, size, size)`` uint8 instance labels (instance ``j``'s visible pixels hold its class,
    0 rectangle, 1 disc, 2 triangle, plus 1; :func:`.instance.instance_labels`)."""
    from edgeslim.components.tasks.segmentation.instance import instance_labels

    rng = np.random.default_rng(seed)
    scenes = [_scene(rng, size) for _ in range(n)]
    labels = np.empty(n, dtype=object)
    labels[:] = [instance_labels([c - 1 for c, _ in s[2]], np.stack([m for _, m in s[2]]) if s[2] else
                                 np.zeros((0, size, size), bool)) for s in scenes]
    return np.stack([s[0] for s in scenes]), labels


def as_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, H, W, 3)`` images as model inputs ``(n, 3, H, W)`` float32 in 0..1."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def write_mask_folders(root: str | Path, counts: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """Scenes written as the ``masks`` provider reads them: ``root/<split>/images/NNNN.png`` and
    ``root/<split>/masks/NNNN.png`` (8-bit class ids), ``counts`` scenes per split."""
    from PIL import Image

    root = Path(root)
    for k, (split, n) in enumerate(counts.items()):
        images, masks = shape_scenes(n, size, seed + 1000 * k)
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i, (img, m) in enumerate(zip(images, masks)):
            Image.fromarray(img).save(root / split / "images" / f"{i:04d}.png")
            Image.fromarray(m).save(root / split / "masks" / f"{i:04d}.png")
    return root
