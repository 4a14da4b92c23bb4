"""Why outfit items miss: bench/photo.py's outfit half replayed in-process, every miss classified.

    python bench/photo_misses.py [--seeds 101,102,103] [--outfits 60] [--set detect.box_padding=0.05] [--verbose]

The same catalog (``sample.make_catalog``, 2,000 products, embedded whole as the demo does), the
same composites (``photo.outfit_photo``; the bench draws seed 20) and the service's own code path
(``detect.whole_photo``, ``imaging.fit``, ``detect.find``, ``detect.routes``, ``detect.embed_input``,
``detect.merge_routes``), with an exact scan per category instead of the service's Annoy indexes.
Seeds other than 20 are a tuning split: pick settings there and report them on the bench's seed.

Per true item whose own product is not in its object's top 10, one reason: ``not_detected`` (no
box of any score on it), ``low_score`` (only boxes under ``detect.score_threshold``),
``suppressed`` (a box on it was absorbed by one on a neighbour), ``poor_box`` (an object overlaps
it, IoU < 0.5), ``wrong_category`` (its category not among the object's routes), ``merge_lost``
(in the top 10 of its category, lost in the merge of routes), ``rank>10`` (its category searched,
ranked 10th or later). Prints one JSON line ``{"bench": "photo_misses", ...}``.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import photo  # noqa: E402

from engine import config, detect, detector, imaging, outfits, sample  # noqa: E402
from engine.embed import Embedder  # noqa: E402


def catalog_vectors(folder: Path, products: int, emb: Embedder, size: int):
    """The demo catalog's rows and their whole-image vectors, as the pipeline makes them."""
    import pyarrow.parquet as pq

    sample.make_catalog(folder, products)
    rows = pq.read_table(folder / "catalog.parquet").to_pylist()
    vecs = [emb(np.stack([imaging.prepare(Path(r["image_url"][len("file://"):]).read_bytes(), size)
                          for r in rows[i:i + 64]])) for i in range(0, len(rows), 64)]
    return rows, np.concatenate(vecs)


def boxes_of(objects: list[dict], scale: float) -> np.ndarray:
    return np.asarray([[v * scale for v in o["box"]] for o in objects], np.float32).reshape(-1, 4)


def best_iou(box, boxes: np.ndarray) -> tuple[float, int]:
    if not len(boxes):
        return 0.0, -1
    ious = detector._box_iou(np.asarray([box], np.float32), boxes)[0]
    return float(ious.max()), int(ious.argmax())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="101,102,103", help="composite seeds (the bench's: 20)")
    ap.add_argument("--outfits", type=int, default=60, help="per seed")
    ap.add_argument("--products", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--verbose", action="store_true", help="one line per miss on stderr")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    cfg = config.load(None, args.set)
    dc, size = cfg.detect, cfg.embed.image_size
    emb = Embedder(cfg.embed, device="cpu")
    with tempfile.TemporaryDirectory(prefix="photo-misses-") as tmp:
        rows, vecs = catalog_vectors(Path(tmp), args.products, emb, size)
    ids = [r["product_id"] for r in rows]
    at = {p: j for j, p in enumerate(ids)}
    labels = {r["product_id"]: r["label"] for r in rows}
    in_cat: dict[str, list[int]] = collections.defaultdict(list)
    for j, r in enumerate(rows):
        in_cat[r["category"]].append(j)
    model = detect.load(dc)
    items, _ = sample.load()
    pool = sorted(int(p[3:]) for p in ids if int(p[3:]) >= outfits.HELD_OUT_FROM)
    reasons, ranks, precisions = collections.Counter(), [], []
    hits = n_items = n_objects = 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        for _ in range(args.outfits):  # the draws of photo.outfit_photos, in its order
            chosen = [int(i) for i in rng.choice(pool, size=int(rng.integers(2, 5)), replace=False)]
            img, truth, placed = photo.outfit_photo(rng, items, chosen)
            buf = io.BytesIO()
            img.save(buf, "PNG")
            img = imaging.decode(buf.getvalue())
            whole = detect.whole_photo(img, dc, size)
            view = Image.fromarray(imaging.fit(img, dc.image_size))
            scale = img.width / view.width
            raw = [o for o in detector.detect(model, [view])[0]]
            found = detect.find(model, dc, [view])[0]
            n_objects += len(found)
            inputs = [detect.embed_input(view, o, dc, size, whole) for o in found]
            queries = emb(np.stack(inputs)) if inputs else np.zeros((0, vecs.shape[1]), np.float32)
            kept = boxes_of(found, scale)
            for box, i in zip(truth, placed):
                n_items += 1
                pid = sample.product_id(i)
                iou, o_at = best_iou(box, kept)
                if iou < 0.5:
                    precisions.append(0.0)
                    raw_iou, r_at = best_iou(box, boxes_of(raw, scale))
                    why = ("poor_box" if iou > 0.1 else "not_detected") if raw_iou < 0.5 else (
                        "suppressed" if raw[r_at]["score"] >= dc.score_threshold else "low_score")
                    reasons[why] += 1
                    if args.verbose:
                        print(json.dumps({"seed": seed, "product": pid, "label": labels[pid], "why": why}), file=sys.stderr)
                    continue
                o, q = found[o_at], queries[o_at]
                parts = []
                for c in detect.routes(o, dc):
                    js = np.asarray(in_cat.get(c, []), int)
                    s = vecs[js] @ q
                    top = np.argsort(-s)[:10]
                    parts.append((c, [ids[js[t]] for t in top], s[top]))
                got = [h["product_id"] for h in detect.merge_routes(parts, 10)]
                precisions.append(sum(labels[g] == labels[pid] for g in got) / 10)
                if pid in got:
                    hits += 1
                    continue
                own = rows[at[pid]]["category"]
                s = vecs[np.asarray(in_cat[own], int)] @ q
                rank = int((s > float(vecs[at[pid]] @ q)).sum())
                ranks.append(rank)
                why = ("wrong_category" if own not in detect.routes(o, dc) else "merge_lost" if rank < 10 else "rank>10")
                reasons[why] += 1
                if args.verbose:
                    print(json.dumps({"seed": seed, "product": pid, "label": labels[pid], "why": why, "rank": rank,
                                      "category": o["category"], "score": o["score"], "iou": round(iou, 2),
                                      "routes": detect.routes(o, dc), "alternatives": o["alternatives"]}), file=sys.stderr)
    print(json.dumps({"bench": "photo_misses", "seeds": args.seeds, "set": args.set, "items": n_items,
                      "outfit_item_recall_at_10": round(hits / n_items, 4),
                      "outfit_fine_p10": round(float(np.mean(precisions)), 4),
                      "objects_per_item": round(n_objects / n_items, 4), "misses": dict(sorted(reasons.items())),
                      "miss_ranks": sorted(ranks), "elapsed_s": round(time.monotonic() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
