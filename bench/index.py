"""Index benchmark: sharded vs single Annoy build, recall@10 vs exact search, query latency per shard.

    python bench/index.py [--sizes 100000,1000000] [--max-shard-size 50000] [--n-trees 40]
                          [--search-k 2000] [--queries 500] [--real real10k.npy | --embed-real real10k.npy]

Data: clustered synthetic 512-d unit vectors (engine/synthetic.py), one fixed mixture fitted to
real embeddings and sampled at each size, all in one category so that it splits into shards. With
``--real FILE`` (or ``--embed-real FILE``, which first embeds the 10,000 shipped Fashion-MNIST
images with the pipeline's model and saves them there), a first line compares the synthetic data
with the real embeddings: relative contrast, local intrinsic dimension and Annoy's recall curve.

Per size, on a local loopback Ray cluster (or RAY_ADDRESS): features written in the pipeline's
layout, then ``engine.index.build`` twice: sharded (``--max-shard-size``, one Ray task per shard,
one CPU each) and single (one Annoy over everything, one task with every CPU as Annoy threads).
Queries are fresh draws from the same mixture (not in the index). Recall@10 is the sharded search
(every shard's top 10, merged by score, as the service does) against brute force over all vectors;
ties at the 10th exact score count as hits. Query times are single queries, one thread, per shard;
exact search times are one query against every vector (numpy, BLAS on all cores).

Prints one JSON object per size with ``"bench": "index"`` and a short table on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import index, raycluster, synthetic, validate  # noqa: E402
from engine.config import IndexConfig  # noqa: E402
from engine.storage import Storage  # noqa: E402

MV = "bench-synthetic-512"
K = 10
TARGET_RECALL, TARGET_P50_MS, TARGET_BUILD_1M_S = 0.95, 1.0, 300.0


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def connect(cpus: int | None) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    os.environ.update(raycluster.loopback_env())
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=512 * 2**20)  # the builds read parquet themselves; leave memory to them


# ---------------------------------------------------------------- data realism


def data_stats(x: np.ndarray, queries: int = 300, seed: int = 0) -> dict:
    """Relative contrast at k=10, local intrinsic dimension (MLE, k=20), Annoy recall@10 by search_k."""
    from annoy import AnnoyIndex

    rng = np.random.default_rng(seed)
    n, d = x.shape
    q = rng.choice(n, queries, replace=False)
    sims = x[q] @ x.T
    sims[np.arange(queries), q] = -np.inf
    order = np.argsort(-sims, axis=1)[:, :20]
    dist = np.sqrt(np.maximum(2 - 2 * np.take_along_axis(sims, order, 1), 1e-12))
    rand = np.sqrt(np.maximum(2 - 2 * sims[:, rng.choice(n, 200)], 0)).mean(1)
    ann = AnnoyIndex(d, "angular")
    ann.set_seed(1)
    for i in range(n):
        ann.add_item(i, x[i])
    ann.build(50)
    curve = {}
    for search_k in (500, 1000, 2000):
        rec = [len(set(g for g in ann.get_nns_by_vector(x[qi], K + 1, search_k=search_k) if g != qi)
                   & set(order[j, :K])) / K for j, qi in enumerate(q)]
        curve[str(search_k)] = round(float(np.mean(rec)), 3)
    return {"vectors": n, "relative_contrast_10": round(float(np.median(rand / dist[:, 9])), 3),
            "lid_20": round(float(np.median(-1 / np.mean(np.log(dist[:, :19] / dist[:, 19:20]), axis=1))), 1),
            "annoy50_recall_at_10_by_search_k": curve}


def embed_real(path: str) -> None:
    """Embed the shipped Fashion-MNIST test images as the pipeline does (render -> preprocess -> model)."""
    from engine import imaging, sample
    from engine.config import EmbedConfig
    from engine.embed import Embedder

    images, _ = sample.load()
    model = Embedder(EmbedConfig(), device="cpu")
    out = np.zeros((len(images), 512), np.float32)
    for lo in range(0, len(images), 64):
        batch = np.stack([imaging.preprocess(sample.render(im), 224) for im in images[lo:lo + 64]])
        out[lo:lo + 64] = model(batch)
    np.save(path, out)


# ---------------------------------------------------------------- one size


def search_all(shards, queries: np.ndarray):
    """Sharded answers (merged top-k ids and scores) and every per-shard query time."""
    answers, times = [], []
    for q in queries:
        vec, parts = q.tolist(), []
        for s in shards:
            t0 = time.perf_counter()
            ids, scores = s.search(vec, K)
            times.append(time.perf_counter() - t0)
            parts.append((s.category, ids, scores))
        answers.append(index.merge(parts, K))
    return answers, np.array(times)


def recall_of(answers, truth_ids, kth) -> float:
    rec = [sum(h["product_id"] in set(t) or h["score"] >= k - validate.TIE for h in a) / K
           for a, t, k in zip(answers, truth_ids, kth)]
    return float(np.mean(rec))


def exact_ms(shards, queries: np.ndarray, n: int) -> np.ndarray:
    """One query at a time against every vector (contiguous copies: what a brute-force service holds)."""
    blocks = [np.ascontiguousarray(s.item_vectors()) for s in shards]
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        best = []
        for b in blocks:
            scores = b @ q
            top = np.argpartition(-scores, K - 1)[:K]
            best.append(scores[top])
        np.sort(np.concatenate(best))[-K:]
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e3


def run_size(n: int, args, workdir: str) -> dict:
    root = os.path.join(workdir, f"n{n}")
    storage = Storage(root)
    mixture = synthetic.Clusters(args.dim, seed=1)
    t0 = time.time()
    synthetic.make_run(storage, MV, "r", {"catalog": n}, args.dim, mixture, seed=3, rows_per_file=50_000)
    gen_s = time.time() - t0
    params = dict(n_trees=args.n_trees, search_k=args.search_k, seed=0)
    t0 = time.time()
    sharded = index.build(root, MV, "r", "sharded", IndexConfig(max_shard_size=args.max_shard_size, **params))
    build_sharded_s = time.time() - t0
    out = {"bench": "index", "vectors": n, "dim": args.dim, "data": "synthetic-clustered (engine/synthetic.py)",
           "categories": 1, "shards": sharded["build"]["shards"], "max_shard_size": args.max_shard_size,
           "n_trees": args.n_trees, "search_k": args.search_k, "cpus": args.cpus_used,
           "generate_s": round(gen_s, 1), "build_sharded_s": round(build_sharded_s, 1),
           "shard_memory_request_gib": round(max(s["memory_request"] for s in sharded["categories"]["catalog"]["shards"])
                                             / 2**30, 2),
           "index_bytes": sum(s["bytes"] for s in sharded["categories"]["catalog"]["shards"])}
    queries = mixture.sample(args.queries, np.random.default_rng(99))
    loaded = index.LoadedIndex.load(storage, MV, "sharded", cache_dir=os.path.join(workdir, "cache"), verify=False)
    shards = loaded.categories["catalog"]
    truth_ids, kth = validate.exact_top(shards, queries, K)
    search_all(shards, queries[:50])  # warm the page cache: latency of a serving index, not of a cold disk
    curve = {}
    for search_k in args.also_search_k:  # the same index, other query-time settings
        for s in shards:
            s.search_k = search_k
        answers, times = search_all(shards, queries)
        curve[str(search_k)] = {"recall_at_10": round(recall_of(answers, truth_ids, kth), 4),
                                "p50_query_ms_per_shard": round(float(np.median(times)) * 1e3, 3)}
    for s in shards:
        s.search_k = args.search_k
    answers, times = search_all(shards, queries)
    per_query = times.reshape(len(queries), len(shards)).sum(axis=1)
    ex = exact_ms(shards, queries, min(len(queries), 100))
    out.update(recall_at_10=round(recall_of(answers, truth_ids, kth), 4),
               p50_query_ms_per_shard=round(float(np.median(times)) * 1e3, 3),
               p99_query_ms_per_shard=round(float(np.percentile(times, 99)) * 1e3, 3),
               p50_query_ms_all_shards_one_thread=round(float(np.median(per_query)) * 1e3, 3),
               exact_p50_ms=round(float(np.median(ex)), 2),
               queries=len(queries))
    if curve:
        out["other_search_k"] = curve
    loaded.close()
    if not args.no_single:
        t0 = time.time()
        index.build(root, MV, "r", "single", IndexConfig(max_shard_size=n, cpus_per_shard=args.cpus_used, **params))
        out["build_single_s"] = round(time.time() - t0, 1)
        single = index.LoadedIndex.load(storage, MV, "single", cache_dir=os.path.join(workdir, "cache"), verify=False)
        one = single.categories["catalog"]
        search_all(one, queries[:50])
        answers, times = search_all(one, queries)
        out.update(recall_at_10_single=round(recall_of(answers, truth_ids, kth), 4),
                   p50_query_ms_single=round(float(np.median(times)) * 1e3, 3))
        one[0].search_k = args.search_k * len(shards)  # as many candidates as the sharded search looks at
        answers, times = search_all(one, queries)
        out.update(recall_at_10_single_same_candidates=round(recall_of(answers, truth_ids, kth), 4),
                   p50_query_ms_single_same_candidates=round(float(np.median(times)) * 1e3, 3))
        single.close()
    out["exact_vs_shard_p50"] = round(out["exact_p50_ms"] / out["p50_query_ms_per_shard"], 1)
    ok = out["recall_at_10"] >= TARGET_RECALL and out["p50_query_ms_per_shard"] <= TARGET_P50_MS
    if n >= 1_000_000:
        ok = ok and build_sharded_s < TARGET_BUILD_1M_S
    out["meets_targets"] = ok
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--max-shard-size", type=int, default=50_000)
    ap.add_argument("--n-trees", type=int, default=40)
    ap.add_argument("--search-k", type=int, default=2000)
    ap.add_argument("--also-search-k", default="", help="comma-separated search_k values to report as well")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--cpus", type=int, default=None, help="local cluster CPUs (default: all)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-index build")
    ap.add_argument("--real", help=".npy of real embeddings to compare the synthetic data with")
    ap.add_argument("--embed-real", help="embed the shipped Fashion-MNIST images into this .npy first")
    ap.add_argument("--workdir", default=None, help="scratch space (default: a temp dir, removed after)")
    args = ap.parse_args()
    args.also_search_k = [int(v) for v in args.also_search_k.split(",") if v]
    if args.embed_real:
        embed_real(args.embed_real)
        args.real = args.embed_real
    if args.real:
        real = np.load(args.real)
        syn = synthetic.Clusters(real.shape[1], seed=1).sample(len(real), np.random.default_rng(3))
        emit({"bench": "index-data", "real": {"source": "EfficientNet-Lite0 512-d of Fashion-MNIST test images",
                                              **data_stats(real)}, "synthetic": data_stats(syn)})
    import ray

    connect(args.cpus)
    args.cpus_used = int(ray.cluster_resources().get("CPU", 1))
    workdir = args.workdir or tempfile.mkdtemp(prefix="lookalike-bench-index-")
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(n, args, workdir))
            emit(rows[-1])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        ray.shutdown()
    cols = ["vectors", "shards", "build_sharded_s", "build_single_s", "recall_at_10", "recall_at_10_single",
            "p50_query_ms_per_shard", "exact_p50_ms", "meets_targets"]
    print(" | ".join(cols), file=sys.stderr)
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols), file=sys.stderr)
    return 0 if all(r["meets_targets"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
