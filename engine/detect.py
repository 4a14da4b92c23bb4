"""Detect stage: a catalog image -> one row per object (category, box, score, model-ready crop).

The detector (engine/detector.py) finds objects; each kept object becomes a padded crop,
preprocessed exactly like a whole image (``crop_input`` is shared with the service's POST
/search). Per image, the best box of each category is kept: two shoes of one pair are one
"shoes" object. ``detect.index_objects`` decides which objects a catalog image contributes:

- ``own``: the object of the catalog's category; the whole image when none was found;
- ``all``: every object, each in its category's index; the catalog's category is always
  among them (the whole image when it was not found), so ``/similar/{product_id}`` works.

Every input row leaves as one or more rows; rejected and reused rows pass through as they came.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
from PIL import Image

from engine import imaging
from engine.config import DetectConfig

log = logging.getLogger(__name__)
BOX_TYPE = pa.list_(pa.float32(), 4)
OBJECT_FIELDS = [pa.field("box", BOX_TYPE), pa.field("score", pa.float32())]


def padded(box, padding: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box grown by ``padding`` of its size on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * padding, (y1 - y0) * padding
    return (max(0, int(x0 - dx)), max(0, int(y0 - dy)), min(size[0], int(round(x1 + dx))),
            min(size[1], int(round(y1 + dy))))


def crop_input(img: Image.Image, box, padding: float, size: int) -> np.ndarray:
    """The embedder's input for one object: its padded crop, preprocessed like any image."""
    return imaging.preprocess(img.crop(padded(box, padding, img.size)), size)


def load(cfg: DetectConfig, device: str = "cpu", storage_options: dict | None = None):
    from engine import detector

    uri = None if cfg.detector == "shipped" else cfg.detector
    model = detector.load(uri, storage_options, score_thresh=cfg.score_threshold, max_objects=cfg.max_objects)
    return model.to(device)


def find(model, cfg: DetectConfig, images: list[Image.Image]) -> list[list[dict]]:
    """Per image, its objects best first, labels mapped to catalog categories."""
    from engine import detector

    found = detector.detect(model, images, cfg.threads or None) if images else []
    return [[{**o, "category": cfg.category(o["category"])} for o in usable(objs, img.size)]
            for objs, img in zip(found, images)]


def usable(objects: list[dict], size: tuple[int, int]) -> list[dict]:
    """Objects whose box, clipped to the image, still has area (at least a pixel each way);
    a zero-area, inverted, non-finite or outside box would crash the crop."""
    out = []
    for o in objects:
        x0, y0, x1, y1 = (float(v) for v in o["box"])
        if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(size[0]), x1), min(float(size[1]), y1)
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            out.append({**o, "box": [x0, y0, x1, y1]})
    return out


def best_per_category(objects: list[dict]) -> list[dict]:
    seen, out = set(), []
    for o in sorted(objects, key=lambda o: -o["score"]):
        if o["category"] not in seen:
            seen.add(o["category"])
            out.append(o)
    return out


def select(objects: list[dict], own: str, policy: str, size: tuple[int, int]) -> list[dict]:
    """The objects a catalog image is indexed by, its own category first (see the module docstring)."""
    kept = best_per_category(objects)
    mine = [o for o in kept if o["category"] == own]
    if not mine:
        mine = [{"category": own, "box": [0.0, 0.0, float(size[0]), float(size[1])], "score": None}]
    return mine + ([o for o in kept if o["category"] != own] if policy == "all" else [])


class DetectStage:
    """Ray Data actor: rows with full-size ``pixels`` (``width`` x ``height``) -> object rows with
    square model-ready ``pixels``, ``box`` and ``score``; ``object`` numbers a row's objects."""

    def __init__(self, cfg: dict, image_size: int, device: str = "cpu", storage_options: dict | None = None):
        import torch

        self.cfg = DetectConfig.model_validate(cfg)
        self.size = image_size
        if device == "cpu":
            torch.set_num_threads(self.cfg.threads or os.cpu_count() or 1)
        self.model = load(self.cfg, device, storage_options)
        log.info("detect actor ready on %s", device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        images = {i: Image.frombuffer("RGB", (rows[i]["width"], rows[i]["height"]), rows[i]["pixels"])
                  for i in ok}
        found = dict(zip(ok, find(self.model, self.cfg, [images[i] for i in ok])))
        out = []
        for i, row in enumerate(rows):
            if i not in found:
                out.append({**row, "box": None, "score": None})
                continue
            img = images[i]
            objects = select(found[i], row["catalog_category"], self.cfg.index_objects, img.size)
            for n, o in enumerate(objects):
                pixels = crop_input(img, o["box"], self.cfg.box_padding if o["score"] is not None else 0.0, self.size)
                out.append({**row, "category": o["category"], "object": n, "objects": len(objects),
                            "box": o["box"], "score": o["score"], "pixels": pixels.tobytes(),
                            "width": self.size, "height": self.size})
        schema = batch.schema
        for f in OBJECT_FIELDS:
            schema = schema.append(f) if f.name not in schema.names else schema
        return pa.Table.from_pylist(out, schema=schema)
