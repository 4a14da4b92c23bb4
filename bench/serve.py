"""Service benchmark: /similar against a no-op deployment under the same load, then a hot swap under load.

    python bench/serve.py [--requests 3000] [--concurrency 8] [--per-category 20000]

Starts a local loopback Ray cluster (or joins RAY_ADDRESS), builds two index versions of clustered
synthetic 512-d vectors (engine/synthetic.py; 5 categories; v2 = the same products with moved
vectors, so its answers differ), publishes v1 and starts the service as ``lookalike serve`` does,
with ``--groups`` Searcher groups (0: the ingress searches). In the same run it deploys a no-op FastAPI ingress (same replica options)
that answers a constant JSON body: the cost of Serve + HTTP + FastAPI alone.

1. ``noop`` then ``similar``: ``--requests`` GETs each, ``--concurrency`` keep-alive client threads,
   random products (``/similar/{id}?k=10``); p50/p99 latency and requests per second.
2. ``swap``: the same load on /similar (half the queries span all categories, so both searcher
   groups answer), and v2 is published a third of the way in; the load runs until
   ``--requests`` are done and v2 has answered at least 300. Every answer is compared with what
   its claimed version answers for that query (computed here from the same index files): an
   answer matching neither is a mixed version; any non-200 or dropped connection is an error.

Prints one JSON object with ``"bench": "serve"``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import config, demo, index, publish, raycluster, synthetic  # noqa: E402
from engine.storage import Storage  # noqa: E402

MV = "effnet-lite0-512-v1"
CATEGORIES = ["bags", "bottoms", "dresses", "shoes", "tops"]
K = 10
TARGET_RATIO = 1.5


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def build_versions(root: str, per_category: int, dim: int) -> dict:
    storage = Storage(root)
    mixture = synthetic.Clusters(dim, seed=1)
    sizes = {c: per_category for c in CATEGORIES}
    vectors = {}
    synthetic.make_run(storage, MV, "r1", sizes, dim, mixture, seed=3, vectors_out=vectors)
    rng = np.random.default_rng(4)
    for cat, vecs in vectors.items():
        synthetic.write_features(storage, MV, "r2", cat, [f"{cat}-{i:07d}" for i in range(len(vecs))],
                                 synthetic.perturb(vecs, 0.8, rng))
    cfg = config.load(None, [f"source.path={root}/unused.parquet", f"storage.root={root}"]).index
    times = {}
    for run, version in (("r1", "v1"), ("r2", "v2")):
        t0 = time.time()
        index.build(root, MV, run, version, cfg)
        times[version] = round(time.time() - t0, 1)
    return times


def expected_answers(root: str, queries: list[tuple[str, str | None]]) -> dict:
    """(product_id, categories) -> version -> product_ids that version answers."""
    storage = Storage(root)
    out: dict = {q: {} for q in queries}
    for version in ("v1", "v2"):
        loaded = index.LoadedIndex.load(storage, MV, version, cache_dir=os.path.join(root, "cache"), verify=False)
        for pid, cats in queries:
            loc = loaded.locate(pid)
            hits = loaded.search(loaded.vector(loc), K, cats.split(",") if cats else [loc.category], exclude=pid)
            out[(pid, cats)][version] = {h["product_id"] for h in hits}
        loaded.close()
    return out


class Load:
    """``threads`` keep-alive clients sending GETs back to back; latencies and answers recorded."""

    def __init__(self, port: int, paths, threads: int, total: int, check=None, until=None):
        self.port, self.paths, self.total, self.check, self.until = port, paths, total, check, until
        self.sent = 0
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.versions: dict[str, int] = {}
        self.mixed: list = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _next(self) -> int | None:
        with self.lock:
            if self.sent >= self.total and (self.until is None or self.until(self)):
                return None
            self.sent += 1
            return self.sent

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while self._next() is not None:
            key, path = self.paths[rng.integers(len(self.paths))]
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
            except Exception as exc:  # noqa: BLE001 - counted, the connection renewed
                with self.lock:
                    self.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            elapsed = time.perf_counter() - t0
            with self.lock:
                self.latencies.append(elapsed)
                if status != 200:
                    self.errors.append(f"{path}: HTTP {status}: {body[:200]!r}")
                elif self.check is not None:
                    self.check(self, key, json.loads(body))
        conn.close()

    def run(self) -> "Load":
        t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        for t in self.threads:
            t.join()
        self.wall = time.perf_counter() - t0
        return self

    def stats(self, prefix: str) -> dict:
        lat = np.array(self.latencies) * 1e3
        return {f"{prefix}_p50_ms": round(float(np.median(lat)), 2), f"{prefix}_p99_ms": round(float(np.percentile(lat, 99)), 2),
                f"{prefix}_rps": round(len(lat) / self.wall, 1), f"{prefix}_requests": len(lat) + len(self.errors)}


def check_version(load: Load, key, body: dict) -> None:
    version = body.get("index_version")
    load.versions[version] = load.versions.get(version, 0) + 1
    if {r["product_id"] for r in body["results"]} != load.expected[key].get(version):
        load.mixed.append((key, version))


def noop_app():
    from fastapi import FastAPI
    from ray import serve

    noop = FastAPI()

    @serve.deployment(name="Noop")
    @serve.ingress(noop)
    class Noop:
        @noop.get("/similar/{product_id}")
        def similar(self, product_id: str):
            return {"product_id": product_id, "index_version": "noop", "results": []}

    return Noop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--per-category", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--groups", type=int, default=0, help="searcher groups (0: the ingress searches, the local default)")
    args = ap.parse_args()

    os.environ.update(raycluster.loopback_env())
    import ray
    from ray import serve

    from serve import app

    workdir = tempfile.mkdtemp(prefix="lookalike-bench-serve-")
    root = os.path.join(workdir, "store")
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     _temp_dir=os.path.join(workdir, "ray"))
        build_s = build_versions(root, args.per_category, args.dim)
        publish.publish(Storage(root), MV, "v1", keep=5)
        port = demo.free_port()
        cfg = config.load(None, [f"source.path={root}/unused.parquet", f"storage.root={root}",
                                 f"serve.cache_dir={workdir}/cache", f"serve.port={port}", f"embed.dim={args.dim}",
                                 f"serve.searcher_groups={args.groups}", "serve.reload_interval_s=0.5"])
        app.start(cfg)
        opts = {"num_cpus": cfg.serve.replica_cpus}
        serve.run(noop_app().options(ray_actor_options=opts, max_ongoing_requests=cfg.serve.max_ongoing_requests).bind(),
                  name="noop", route_prefix="/noop", blocking=False)

        rng = np.random.default_rng(0)
        ids = [f"{c}-{i:07d}" for c in CATEGORIES for i in rng.choice(args.per_category, 200, replace=False)]
        similar_paths = [(None, f"/similar/{pid}?k={K}") for pid in ids]
        noop_paths = [(None, f"/noop/similar/{pid}?k={K}") for pid in ids]
        for paths in (noop_paths, similar_paths):  # warm up both
            Load(port, paths, args.concurrency, 300).run()
        noop = Load(port, noop_paths, args.concurrency, args.requests).run()
        similar = Load(port, similar_paths, args.concurrency, args.requests).run()

        queries = [(pid, cats) for pid in ids[::4] for cats in (None, ",".join(CATEGORIES))]
        swap_paths = [((pid, cats), f"/similar/{pid}?k={K}" + (f"&category={cats}" if cats else "")) for pid, cats in queries]
        swap = Load(port, swap_paths, args.concurrency, args.requests, check=check_version,
                    until=lambda load: load.versions.get("v2", 0) >= 300)
        swap.expected = expected_answers(root, queries)

        def publish_when_a_third_done():
            while swap.sent < args.requests // 3:
                time.sleep(0.01)
            publish.publish(Storage(root), MV, "v2", keep=5)

        publisher = threading.Thread(target=publish_when_a_third_done, daemon=True)
        publisher.start()
        swap.run()
        out = {"bench": "serve", "concurrency": args.concurrency, "index_vectors": args.per_category * len(CATEGORIES),
               "dim": args.dim, "categories": len(CATEGORIES), "searcher_groups": args.groups,
               "data": "synthetic-clustered (engine/synthetic.py)", "build_s": build_s,
               **similar.stats("similar"), **noop.stats("noop"),
               "similar_errors": len(similar.errors), "noop_errors": len(noop.errors)}
        out["similar_vs_noop_p50"] = round(out["similar_p50_ms"] / out["noop_p50_ms"], 2)
        out.update({**swap.stats("swap"), "swap_errors": len(swap.errors), "swap_mixed_versions": len(swap.mixed),
                    "swap_answers_by_version": swap.versions})
        out["meets_targets"] = (out["similar_vs_noop_p50"] <= TARGET_RATIO and out["swap_errors"] == 0
                                and out["swap_mixed_versions"] == 0 and set(swap.versions) == {"v1", "v2"})
        if swap.errors or swap.mixed:
            print("first problems:", (swap.errors + swap.mixed)[:5], file=sys.stderr)
        emit(out)
        return 0 if out["meets_targets"] else 1
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
