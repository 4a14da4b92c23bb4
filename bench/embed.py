"""Embedding benchmark: the Ray Data embed stage against a bare loop of the same model, same run.

    python bench/embed.py [--images 2000] [--batch-size 32] [--backend auto] [--device auto]

Renders ``--images`` shipped Fashion-MNIST items into model-ready pixels (what the download stage
hands the embed stage), then embeds them twice, best of ``--rounds`` each:

- ``pipeline``: ``ray.data.from_arrow`` -> ``map_batches(EmbedStage)`` on an actor pool, as
  ``engine/pipeline.py`` builds it; the rate is taken between the first and the last output batch,
  so actor start-up (model load, ONNX export) is not counted: a daily run pays it once.
- ``bare``: ``Embedder`` called in a plain loop in this process, same backend, batch size and threads.

Prints JSON lines: one per round, then ``{"bench": "embed", ...}`` with ``pipeline_vs_bare``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import config, imaging, raycluster, sample  # noqa: E402
from engine.embed import Embedder, EmbedStage  # noqa: E402


def pixels_table(n: int, size: int) -> pa.Table:
    items, _ = sample.load()
    pix = [imaging.preprocess(sample.render(items[i % len(items)]), size).tobytes() for i in range(n)]
    return pa.table({"product_id": [sample.product_id(i) for i in range(n)], "status": ["ok"] * n,
                     "category": [sample.CATEGORY[sample.LABELS[0]]] * n, "pixels": pa.array(pix, pa.binary())})


def bare(cfg, device: str, images: np.ndarray) -> dict:
    embedder = Embedder(cfg, device=device)
    b = cfg.batch_size
    embedder(images[:b])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    for i in range(0, len(images), b):
        embedder(images[i:i + b])
    seconds = time.perf_counter() - t0
    return {"run": "bare", "backend": embedder.backend, "img_per_s": round(len(images) / seconds, 1),
            "seconds": round(seconds, 2)}


def pipeline(cfg, device: str, table: pa.Table, block_rows: int) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
    ds = ray.data.from_arrow(blocks).map_batches(
        EmbedStage, fn_constructor_kwargs={"cfg": cfg.model_dump(), "device": device},
        batch_format="pyarrow", batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor if device == "cuda" else 0)
    arrivals = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        arrivals.append((time.perf_counter(), batch.num_rows))
    steady_rows = sum(n for _, n in arrivals[1:])
    seconds = arrivals[-1][0] - arrivals[0][0]
    return {"run": "pipeline", "img_per_s": round(steady_rows / seconds, 1), "seconds": round(seconds, 2),
            "rows": sum(n for _, n in arrivals), "output_batches": len(arrivals)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=None, help="default: embed.batch_size of the config")
    ap.add_argument("--backend", default=None, help="auto | torch | onnx (default: the config's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--block-rows", type=int, default=128, help="rows per input block (the store's shard size "
                    "is larger; smaller blocks only make the rate finer-grained)")
    args = ap.parse_args(argv)

    sets = [f"embed.device={args.device}"]
    sets += [f"embed.batch_size={args.batch_size}"] if args.batch_size else []
    sets += [f"embed.backend={args.backend}"] if args.backend else []
    cfg = config.load(None, sets)
    os.environ.update(raycluster.loopback_env())
    raycluster.connect(cfg.ray)
    device = raycluster.embed_device(cfg.embed.device)
    t0 = time.perf_counter()
    table = pixels_table(args.images, cfg.embed.image_size)
    size = cfg.embed.image_size
    images = np.stack([np.frombuffer(p, np.uint8).reshape(size, size, 3) for p in table.column("pixels").to_pylist()])
    print(json.dumps({"run": "prepare", "images": args.images, "seconds": round(time.perf_counter() - t0, 1)}),
          flush=True)
    pipes, bares = [], []
    for r in range(args.rounds):
        pipes.append({**pipeline(cfg.embed, device, table, args.block_rows), "round": r})
        print(json.dumps(pipes[-1]), flush=True)
        bares.append({**bare(cfg.embed, device, images), "round": r})
        print(json.dumps(bares[-1]), flush=True)
    best_pipe = max(p["img_per_s"] for p in pipes)
    best_bare = max(b["img_per_s"] for b in bares)
    print(json.dumps({
        "bench": "embed", "device": device, "backend": bares[-1]["backend"], "model": cfg.embed.model,
        "images": args.images, "batch_size": cfg.embed.batch_size, "cpus": os.cpu_count(),
        "pipeline_img_per_s": best_pipe, "bare_img_per_s": best_bare,
        "pipeline_vs_bare": round(best_pipe / best_bare, 3),
        "meets_targets": best_pipe / best_bare >= 0.8 and (device != "cpu" or best_pipe >= 60),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
