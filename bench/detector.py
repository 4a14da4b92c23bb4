"""Detector benchmark: mAP@0.5 of the shipped detector on held-out outfit composites, and the
pipeline's detect stage against a bare loop of the same stage code.

    python bench/detector.py [--weights PATH_OR_URI] [--composites 300] [--stage-images 256]

Composites are made from Fashion-MNIST items the training never saw (engine/outfits.py,
``HELD_OUT_FROM``). Prints JSON lines: ``{"bench": "detector", "map50": ..., AP per class, img/s}``,
then ``{"bench": "detector_items", ...}``: objects per true item, false positives per photo,
duplicates, category accuracy and mAP, for the raw boxes and for ``engine.detect.find``'s one
object per item (``engine.detector.per_item``); then ``{"bench": "detect_stage", ...}``: ``DetectStage`` (detect, best box per category, crops
preprocessed for the embedder) on a Ray Data actor pool as ``engine/pipeline.py`` builds it,
against the same class called in a plain loop in this process, on photos decoded to
``detect.image_size`` as the download stage hands them over. The pipeline rate is taken between
the first and last output batch (actor start-up is paid once a run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import config, detector, imaging, outfits, raycluster  # noqa: E402
from engine.detect import DetectStage  # noqa: E402


def photos_table(n: int, size: int) -> pa.Table:
    """What the download stage emits with ``full_size``: decoded photos, longest side ``size``."""
    rows = []
    for i, (img, _, labels) in enumerate(outfits.dataset(n, seed=7, held_out=True)):
        pix = imaging.fit(img, size)
        own = outfits.CLASSES[int(labels[0]) - 1]
        rows.append({"product_id": f"o{i:05d}", "status": "ok", "category": own, "catalog_category": own,
                     "width": pix.shape[1], "height": pix.shape[0], "pixels": pix.tobytes()})
    return pa.Table.from_pylist(rows)


def stage_bare(cfg, table: pa.Table) -> dict:
    stage = DetectStage(cfg.detect.model_dump(), cfg.embed.image_size)
    b = cfg.detect.batch_size
    stage(table.slice(0, b))  # warm-up
    t0 = time.perf_counter()
    objects = sum(stage(table.slice(i, b)).num_rows for i in range(0, table.num_rows, b))
    seconds = time.perf_counter() - t0
    return {"run": "bare", "img_per_s": round(table.num_rows / seconds, 1), "objects": objects}


def stage_pipeline(cfg, table: pa.Table) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    b = cfg.detect.batch_size
    ds = ray.data.from_arrow([table.slice(i, b) for i in range(0, table.num_rows, b)]).map_batches(
        DetectStage, fn_constructor_kwargs={"cfg": cfg.detect.model_dump(), "image_size": cfg.embed.image_size},
        batch_format="pyarrow", batch_size=b, compute=ActorPoolStrategy(size=cfg.detect.actors),
        num_cpus=cfg.detect.cpus_per_actor)
    arrivals = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        arrivals.append((time.perf_counter(), batch.num_rows, len(set(batch.column("product_id").to_pylist()))))
    photos = sum(p for _, _, p in arrivals[1:])
    seconds = arrivals[-1][0] - arrivals[0][0]
    return {"run": "pipeline", "img_per_s": round(photos / seconds, 1), "objects": sum(n for _, n, _ in arrivals)}


def one_per_item(weights, n: int, seed: int = 12345) -> dict:
    """Objects per true item and false positives per photo on the held-out composites: the
    detector's raw boxes (per-category NMS, ``detect.score_threshold``), against what
    ``engine.detect.find`` answers (suppressed across categories, alternatives listed)."""
    from engine import detect

    cfg = config.load(None, [f"detect.detector={weights or 'shipped'}"]).detect
    data = outfits.dataset(n, seed, held_out=True)
    truths = [(b, l) for _, b, l in data]
    raw_model = detector.load(weights, score_thresh=cfg.score_threshold, max_objects=cfg.max_objects)
    model = detect.load(cfg)
    raw, kept = [], []
    for i in range(0, n, 16):
        images = [im for im, _, _ in data[i:i + 16]]
        raw += detector.detect(raw_model, images)
        kept += detect.find(model, cfg, images)
    return {"composites": n, "items": int(sum(len(b) for b, _ in truths)),
            "raw": {**detector.per_item(raw, truths), "map50": detector.map50(raw, truths)["map50"]},
            "one_per_item": {**detector.per_item(kept, truths), "map50": detector.map50(kept, truths)["map50"]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="default: the shipped engine/weights/detector-outfits-v1.pt")
    ap.add_argument("--composites", type=int, default=300)
    ap.add_argument("--stage-images", type=int, default=256, help="photos through the detect stage; 0: skip it")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = detector.load(args.weights)
    t0 = time.perf_counter()
    result = detector.evaluate(model, args.composites)
    seconds = time.perf_counter() - t0
    print(json.dumps({"bench": "detector", "weights": str(args.weights or detector.SHIPPED), **result,
                      "target_map50": 0.7, "meets_target": result["map50"] >= 0.7,
                      "img_per_s": round(args.composites / seconds, 1), "cpus": os.cpu_count()}), flush=True)
    print(json.dumps({"bench": "detector_items", **one_per_item(args.weights, args.composites)}), flush=True)
    if args.stage_images:
        cfg = config.load(None, ["detect.catalog=true", "detect.index_objects=all"]
                          + ([f"detect.detector={args.weights}"] if args.weights else []))
        table = photos_table(args.stage_images, cfg.detect.image_size)
        os.environ.update(raycluster.loopback_env())
        raycluster.connect(cfg.ray)
        pipe, bare = stage_pipeline(cfg, table), stage_bare(cfg, table)
        print(json.dumps({"bench": "detect_stage", "device": "cpu", "photos": table.num_rows,
                          "image_size": cfg.detect.image_size, "batch_size": cfg.detect.batch_size,
                          "objects_out": pipe["objects"], "pipeline_img_per_s": pipe["img_per_s"],
                          "bare_img_per_s": bare["img_per_s"],
                          "pipeline_vs_bare": round(pipe["img_per_s"] / bare["img_per_s"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
