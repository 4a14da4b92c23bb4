"""The embedded sample catalog: real Fashion-MNIST product images (test split, shipped).

Fashion-MNIST (MIT, (c) Zalando SE): 28x28 light-on-dark items. Rendered here as dark-on-white
RGB product shots on disk, with a parquet catalog pointing at them by file:// URL.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

DATA = Path(__file__).resolve().parent / "data" / "fashion-mnist"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CATEGORY = {"T-shirt/top": "tops", "Pullover": "tops", "Coat": "tops", "Shirt": "tops", "Dress": "dresses",
            "Trouser": "bottoms", "Sandal": "shoes", "Sneaker": "shoes", "Ankle boot": "shoes", "Bag": "bags"}
RENDER_SIZE = 112


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels uint8 N) of the shipped 10k test split."""
    return _idx(DATA / "t10k-images-idx3-ubyte.gz"), _idx(DATA / "t10k-labels-idx1-ubyte.gz")


def render(item: np.ndarray, size: int = RENDER_SIZE) -> Image.Image:
    """A 28x28 item as a dark-on-white RGB product shot."""
    img = Image.fromarray(255 - item, "L").resize((size, size), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def product_id(i: int) -> str:
    return f"fm-{i:05d}"


BRANDS = [f"brand-{b:02d}" for b in range(20)]
STYLES = ["Classic", "Relaxed", "Slim", "Everyday", "Soft", "Sport", "Vintage", "Summer", "Winter", "City"]


def title(label: str, brand: str, rng: np.random.Generator) -> str:
    """A product name as a shop shows it (the demo's display column), e.g. "Slim sneaker, Brand 03"."""
    return f"{STYLES[int(rng.integers(len(STYLES)))]} {label.lower()}, {brand.replace('-', ' ').capitalize()}"


def shop_columns(rng: np.random.Generator) -> dict:
    """A product's in_stock, brand and price, as the demo's filter columns (index.filter_columns)."""
    return {"in_stock": bool(rng.random() < 0.8), "brand": BRANDS[min(19, int(rng.zipf(1.6)) - 1)],
            "price": round(float(rng.lognormal(3.5, 0.6)), 2)}


def make_catalog(out_dir: str | os.PathLike, products: int = 2000, seed: int = 0, broken: int = 0,
                 fmt: str = "parquet") -> str:
    """Write ``products`` rendered items (+ ``broken`` deliberately bad rows) and their catalog file.

    The broken rows alternate between a truncated image file and a URL to a missing file, so a
    demo run shows the reject path working.
    """
    images, labels = load()
    if not 1 <= products <= len(images):
        raise ValueError(f"products must be within 1..{len(images)}, got {products}")
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:products])
    rows = []
    shop = np.random.default_rng(seed + 1)  # filter columns: ~80% in stock, 20 brands (skewed), log-normal prices
    names = np.random.default_rng(seed + 2)  # titles, from their own stream so the filter columns stay as they were
    for i in chosen:
        path = out / "images" / f"{product_id(i)}.png"
        if not path.exists():
            render(images[i]).save(path, optimize=False)
        label = LABELS[labels[i]]
        columns = shop_columns(shop)
        rows.append({"product_id": product_id(i), "image_url": path.as_uri(), "category": CATEGORY[label],
                     "label": label, "updated_at": "2026-11-01T00:00:00Z", **columns,
                     "title": title(label, columns["brand"], names)})
    for b in range(broken):
        pid = f"broken-{b:03d}"
        path = out / "images" / f"{pid}.png"
        if b % 2 == 0:
            data = (out / "images" / f"{product_id(chosen[0])}.png").read_bytes()
            path.write_bytes(data[: len(data) // 3])
        rows.append({"product_id": pid, "image_url": path.as_uri(), "category": "tops",
                     "label": "broken", "updated_at": "2026-11-01T00:00:00Z", **shop_columns(shop)})
    table = pa.Table.from_pylist(rows)
    target = out / f"catalog.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, target)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, target)
    else:
        import json

        target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(target)
