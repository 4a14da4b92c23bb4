"""Detect stage: a catalog image -> one row per object (category, box, score, model-ready crop).

The detector (engine/detector.py) finds objects; each kept object becomes a padded crop, its
backdrop made white as catalog shots are (``detect.crop_backdrop``), preprocessed exactly like a
whole image (``crop_input`` is shared with the service's POST /search). The detector's boxes are
suppressed across categories first (``one_per_item``): boxes of different categories on one item
become one object, the best category kept and the others listed as its ``alternatives`` (what
``routes`` searches when the detector is unsure). An object that spans most of the photo
(``detect.whole_photo_share``: a product shot) is embedded as the whole photo, exactly as a
catalog embedded whole makes its vector (``embed_input``). Per image, the best box of each
category is kept: two shoes of one pair are one "shoes" object. ``detect.index_objects`` decides
which objects a catalog image contributes:

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


BACKDROP_RING = 2        # pixels of a crop's border its backdrop colour is read from
DARKEST_BACKDROP = 64    # a backdrop darker than this in any channel is left as it is


def backdrop_to_white(crop: Image.Image) -> Image.Image:
    """The crop with its backdrop made white, as catalog product shots are: each channel scaled so
    the median colour of the crop's border (the backdrop around the item) becomes 255. On a tinted
    studio backdrop a crop otherwise differs from its product's white-background catalog shot by
    the tint, enough to rank the product itself past 10th. A dark backdrop (any channel under
    ``DARKEST_BACKDROP``) is left as it is: scaling it up would only amplify noise."""
    a = np.asarray(crop, np.float32)
    r = BACKDROP_RING
    border = np.concatenate([a[:r].reshape(-1, 3), a[-r:].reshape(-1, 3), a[:, :r].reshape(-1, 3),
                             a[:, -r:].reshape(-1, 3)])
    backdrop = np.median(border, axis=0)
    if backdrop.min() < DARKEST_BACKDROP:
        return crop
    return Image.fromarray(np.clip(np.rint(a * (255.0 / backdrop)), 0, 255).astype(np.uint8), "RGB")


def crop_input(img: Image.Image, box, padding: float, size: int, backdrop: str = "as_is") -> np.ndarray:
    """The embedder's input for one object: its padded crop (``backdrop="white"``: through
    ``backdrop_to_white``), preprocessed like any image."""
    crop = img.crop(padded(box, padding, img.size))
    return imaging.preprocess(backdrop_to_white(crop) if backdrop == "white" else crop, size)


def covers(box, size: tuple[int, int], share: float | None) -> bool:
    """Whether ``box`` spans at least ``share`` of the image's width or height (None: never)."""
    return share is not None and ((box[2] - box[0]) >= share * size[0] or (box[3] - box[1]) >= share * size[1])


def embed_input(img: Image.Image, obj: dict, cfg: DetectConfig, size: int,
                whole: np.ndarray | None = None) -> np.ndarray:
    """The embedder's input for one object: the whole photo (``whole``, or ``img`` preprocessed) when
    the object has no box score (the whole-image fallback) or covers the photo, else its padded crop
    (its backdrop made white with ``detect.crop_backdrop: white``)."""
    if obj["score"] is None or covers(obj["box"], img.size, cfg.whole_photo_share):
        return imaging.preprocess(img, size) if whole is None else whole
    return crop_input(img, obj["box"], cfg.box_padding, size, cfg.crop_backdrop)


def whole_photo(img: Image.Image, cfg: DetectConfig, size: int) -> np.ndarray:
    """An uploaded photo's whole-image input, made as the catalog's own vectors are: from the image
    decoded to ``detect.image_size`` when the pipeline detects (its detect stage crops from that),
    else from the photo as it came (the pipeline embeds catalog images whole)."""
    src = Image.fromarray(imaging.fit(img, cfg.image_size)) if cfg.in_pipeline else img
    return imaging.preprocess(src, size)


def load(cfg: DetectConfig, device: str = "cpu", storage_options: dict | None = None):
    """The detector, keeping boxes down to ``ALTERNATIVE_FLOOR``: below ``detect.score_threshold``
    they only ever become the alternatives of a stronger box on the same item (``find``)."""
    from engine import detector

    uri = None if cfg.detector == "shipped" else cfg.detector
    model = detector.load(uri, storage_options, score_thresh=min(ALTERNATIVE_FLOOR, cfg.score_threshold),
                          max_objects=cfg.max_objects * CANDIDATES_PER_OBJECT)
    return model.to(device)


ALTERNATIVE_FLOOR = 0.05
CANDIDATES_PER_OBJECT = 5
SAME_ITEM_IOU = 0.5      # two boxes overlapping this much (IoU) are one item ...
SAME_ITEM_INSIDE = 0.5   # ... or when this share of the smaller lies inside the larger


def same_item(a, b) -> bool:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    if inter <= 0 or min(area_a, area_b) <= 0:
        return False
    return inter / (area_a + area_b - inter) >= SAME_ITEM_IOU or inter / min(area_a, area_b) >= SAME_ITEM_INSIDE


def one_per_item(objects: list[dict]) -> list[dict]:
    """Class-agnostic suppression: greedily by score, a box on an item already kept is absorbed by
    it; each kept object lists the other categories seen on it, best first, as ``alternatives``
    ({"category", "score"}), its own category never among them."""
    kept: list[dict] = []
    for o in sorted(objects, key=lambda o: -o["score"]):
        owner = next((k for k in kept if same_item(k["box"], o["box"])), None)
        if owner is None:
            kept.append({**o, "alternatives": []})
        elif o["category"] != owner["category"] and all(a["category"] != o["category"] for a in owner["alternatives"]):
            owner["alternatives"].append({"category": o["category"], "score": o["score"]})
    return kept


def find(model, cfg: DetectConfig, images: list[Image.Image]) -> list[list[dict]]:
    """Per image, its objects best first (one per item, each with its ``alternatives``), labels mapped
    to catalog categories; objects under ``detect.score_threshold`` are dropped."""
    from engine import detector

    found = detector.detect(model, images, cfg.threads or None) if images else []
    out = []
    for objs, img in zip(found, images):
        labelled = [{**o, "category": cfg.category(o["category"])} for o in usable(objs, img.size)]
        out.append([o for o in one_per_item(labelled) if o["score"] >= cfg.score_threshold][:cfg.max_objects])
    return out


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


def routes(obj: dict, cfg: DetectConfig) -> list[str]:
    """The categories to search an object in, its own first. When the detector is unsure (its score
    under ``detect.uncertain_score``, or an alternative within ``detect.uncertain_margin`` of it),
    also its best alternatives, up to ``detect.max_routes`` categories in all."""
    unsure = obj["score"] is not None and obj["score"] < cfg.uncertain_score
    out = [obj["category"]]
    for alt in obj.get("alternatives", []):
        if len(out) >= cfg.max_routes:
            break
        if unsure or alt["score"] >= obj["score"] - cfg.uncertain_margin:
            out.append(alt["category"])
    return out


def merge_routes(parts: list, k: int) -> list[dict]:
    """Per-shard hits ``(category, ids, scores)`` of the categories an object was searched in -> its
    top ``k``: the categories ranked by how well their nearest products match (the mean of their top
    3 scores), the best one's results first, the next ones' after. Merging by raw score instead
    mixes in the near misses of a wrong category; this lets retrieval settle the detector's doubt."""
    from engine.index import merge

    by_category: dict[str, list] = {}
    for part in parts:
        by_category.setdefault(part[0], []).append(part)
    ranked = [merge(p, k) for p in by_category.values()]
    ranked.sort(key=lambda hits: -float(np.mean([h["score"] for h in hits[:3]])) if hits else 0.0)
    return [h for hits in ranked for h in hits][:k]


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
                pixels = embed_input(img, o, self.cfg, self.size)
                out.append({**row, "category": o["category"], "object": n, "objects": len(objects),
                            "box": o["box"], "score": o["score"], "pixels": pixels.tobytes(),
                            "width": self.size, "height": self.size})
        schema = batch.schema
        for f in OBJECT_FIELDS:
            schema = schema.append(f) if f.name not in schema.names else schema
        return pa.Table.from_pylist(out, schema=schema)
