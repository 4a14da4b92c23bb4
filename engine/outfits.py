"""Outfit photos with ground truth: several Fashion-MNIST items on one synthetic background.

No installable package ships detector weights we could use, so the project trains its own
(engine/detector.py) on these composites. Items come from the shipped test split only; items at
index ``HELD_OUT_FROM`` and above never appear in training composites, so evaluation measures
items the detector has never seen.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from engine import sample

CLASSES = ["tops", "dresses", "bottoms", "shoes", "bags"]  # detector label i + 1 (0 is background)
HELD_OUT_FROM = 8000
CANVAS = 256


def item_pools() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(items, category labels 1..5, train indices, held-out indices)."""
    items, labels = sample.load()
    cats = np.array([CLASSES.index(sample.CATEGORY[sample.LABELS[y]]) + 1 for y in labels], np.int64)
    idx = np.arange(len(items))
    return items, cats, idx[idx < HELD_OUT_FROM], idx[idx >= HELD_OUT_FROM]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light studio-like backdrop: a tinted vertical gradient, noise, sometimes a soft block."""
    top, bottom = rng.uniform(150, 255, 3), rng.uniform(120, 255, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    bg = top * (1 - t) + bottom * t + np.zeros((size, size, 3))
    if rng.random() < 0.5:
        x0, y0 = rng.integers(0, size - 32, 2)
        w, h = rng.integers(32, size // 2, 2)
        bg[y0:y0 + h, x0:x0 + w] *= rng.uniform(0.75, 0.95)
    bg += rng.normal(0, rng.uniform(2, 10), bg.shape)
    return bg


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def composite(rng: np.random.Generator, items: np.ndarray, cats: np.ndarray, pool: np.ndarray,
              size: int = CANVAS, max_items: int = 4) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One outfit photo: (RGB image, boxes N x 4 as x0 y0 x1 y1 in pixels, labels N in 1..5).

    A quarter are single product shots filling most of the frame, so a catalog-style photo
    is one object, not a handful of fragments.
    """
    canvas = _background(rng, size)
    boxes, labels = [], []
    product_shot = rng.random() < 0.25
    for _ in range(1 if product_shot else int(rng.integers(1, max_items + 1))):
        i = int(rng.choice(pool))
        item = items[i].astype(np.float32)
        ys, xs = np.nonzero(item > 25)
        if len(xs) == 0:
            continue
        crop = item[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        side = int(rng.integers(int(size * 0.6), size + 1)) if product_shot else int(rng.integers(size // 5, size // 2))
        scale = side / max(crop.shape)
        w, h = max(8, round(crop.shape[1] * scale)), max(8, round(crop.shape[0] * scale))
        for _try in range(20):
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, b) < 0.15 for b in boxes):
                break
        else:
            continue
        alpha = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR),
                           np.float32)[..., None] / 255.0
        colour = rng.uniform(0, 110, 3)
        region = canvas[y0:y0 + h, x0:x0 + w]
        canvas[y0:y0 + h, x0:x0 + w] = region * (1 - alpha) + colour * alpha
        boxes.append(box)
        labels.append(int(cats[i]))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    return img, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def dataset(n: int, seed: int, held_out: bool, size: int = CANVAS):
    """``n`` composites from the train or the held-out items, reproducible from ``seed``."""
    items, cats, train, test = item_pools()
    rng = np.random.default_rng(seed)
    pool = test if held_out else train
    return [composite(rng, items, cats, pool, size) for _ in range(n)]


def write_catalog(folder, n: int, seed: int, held_out: bool = True) -> tuple[str, list]:
    """A catalog of ``n`` outfit photos (PNG files): each product is the largest item in its photo.
    Returns (catalog path, [(boxes, labels)] ground truth per product, in catalog order)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "outfits").mkdir(parents=True, exist_ok=True)
    rows, truth = [], []
    for i, (img, boxes, labels) in enumerate(dataset(n, seed, held_out)):
        path = folder / "outfits" / f"outfit-{i:04d}.png"
        img.save(path)
        main = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        rows.append({"product_id": f"outfit-{i:04d}", "image_url": path.resolve().as_uri(),
                     "category": CLASSES[labels[main] - 1], "updated_at": "2026-11-24T00:00:00Z"})
        truth.append((boxes, labels))
    target = folder / "outfits.parquet"
    pq.write_table(pa.Table.from_pylist(rows), target)
    return str(target), truth
