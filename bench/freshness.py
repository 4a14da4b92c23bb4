"""Fresh results and filters, measured. Part "filters": filtered search at 50%, 10% and 1% selectivity.

    python bench/freshness.py [--items 60000] [--dim 64] [--queries 500]

An Annoy shard as the pipeline builds it (``index.n_trees``, ``index.search_k`` of configs/local.yaml)
over clustered vectors, with catalog-like filter columns (in_stock ~80%, 20 skewed brands,
log-normal prices), queried through the service's own code: serve.filters parses and compiles the
filter to a mask, ``Shard.search(keep=mask)`` answers. Exact filtered search (brute force over the
matching rows) is the truth. Prints JSON lines; the last has ``"bench": "freshness"``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from engine import config, index, sample  # noqa: E402
from serve import filters  # noqa: E402

K = 10


def build(items: int, dim: int, tmp: str) -> tuple[index.Shard, np.ndarray, pa.Table]:
    from annoy import AnnoyIndex

    cfg = config.load(None, []).index
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, dim))
    vectors = (centres[rng.integers(0, 200, items)] + 0.5 * rng.normal(size=(items, dim))).astype(np.float32)
    ann = AnnoyIndex(dim, cfg.metric)
    ann.set_seed(cfg.seed)
    for i, v in enumerate(vectors):
        ann.add_item(i, v)
    ann.build(cfg.n_trees, n_jobs=-1)
    path = f"{tmp}/shard-000.ann"
    ann.save(path)
    ann.unload()
    shop = np.random.default_rng(1)
    attrs = pa.Table.from_pylist([sample.shop_columns(shop) for _ in range(items)])
    shard = index.Shard("tops", {"shard": 0, "index": "shard-000.ann"}, dim,
                        {"metric": cfg.metric, "search_k": cfg.search_k}, path,
                        pa.array([f"p{i}" for i in range(items)]), pa.array(np.ones(items, bool)))
    shard.attrs = attrs
    return shard, vectors, attrs


def selective_filters(attrs: pa.Table) -> dict[str, str]:
    """Filters of about 50%, 10% and 1% of the items, written as a user would."""
    price = np.asarray(attrs.column("price").to_numpy())
    return {"50pct": f"price < {np.quantile(price, 0.5 / 0.8):.2f} AND in_stock = true",
            "10pct": f"in_stock = true AND price < {np.quantile(price, 0.125):.2f}",
            "1pct": f"in_stock = true AND brand IN ('brand-03', 'brand-09') AND price < "
                    f"{np.quantile(price, 0.25):.2f}"}


def run_filters(items: int, dim: int, queries: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lookalike-freshness-") as tmp:
        shard, vectors, attrs = build(items, dim, tmp)
        columns = filters.Columns(attrs)
        types = {"in_stock": "bool", "brand": "string", "price": "float"}
        rng = np.random.default_rng(2)
        qs = vectors[rng.integers(0, items, queries)] + 0.1 * rng.normal(size=(queries, dim)).astype(np.float32)
        out, violations, short, recalls, p50 = {}, 0, 0, {}, {}
        for name, text in selective_filters(attrs).items():
            t = time.perf_counter()
            keep = columns.mask(filters.parse(text, types))
            compile_ms = (time.perf_counter() - t) * 1e3
            allowed = np.flatnonzero(keep)
            lat, rec = [], []
            for q in qs:
                t = time.perf_counter()
                ids, _ = shard.search(q.tolist(), K, keep=keep)
                lat.append(time.perf_counter() - t)
                pos = np.array([int(i[1:]) for i in ids], np.int64)
                violations += int((~keep[pos]).sum()) if len(pos) else 0
                short += int(len(ids) < min(K, len(allowed)))
                truth, _ = shard.exact(q.tolist(), K, allowed)
                rec.append(len(set(ids) & set(truth)) / max(1, len(truth)))
            recalls[name] = round(float(np.mean(rec)), 4)
            p50[name] = float(np.median(lat))
            out[name] = {"filter": text, "selectivity": round(len(allowed) / items, 4), "recall_at_10": recalls[name],
                         "p50_ms": round(p50[name] * 1e3, 3), "mask_ms": round(compile_ms, 2)}
        lat = []
        for q in qs:
            t = time.perf_counter()
            shard.search(q.tolist(), K)
            lat.append(time.perf_counter() - t)
        unfiltered = float(np.median(lat))
        shard.close()
    return {"bench": "freshness_filters", "items": items, "dim": dim, "queries_per_selectivity": queries,
            "by_selectivity": out, "unfiltered_p50_ms": round(unfiltered * 1e3, 3),
            "filtered_violations": violations, "filtered_recall_at_10_min": min(recalls.values()),
            "filtered_p50_over_unfiltered_10pct": round(p50["10pct"] / unfiltered, 3), "k_short_answers": short}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=60_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    result = run_filters(args.items, args.dim, args.queries)
    print(json.dumps(result), flush=True)
    keys = ("filtered_violations", "filtered_recall_at_10_min", "filtered_p50_over_unfiltered_10pct", "k_short_answers")
    print(json.dumps({"bench": "freshness", **{k: result[k] for k in keys},
                      "targets": {"filtered_violations": 0, "filtered_recall_at_10_min": 0.9,
                                  "filtered_p50_over_unfiltered_10pct": 3, "k_short_answers": 0}}))


if __name__ == "__main__":
    main()
