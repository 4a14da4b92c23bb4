"""A year of daily runs, and the planning funnel at millions of rows.

    python bench/scale.py [--products 20000] [--dim 64] [--days 365] [--skip-funnel]

Part "year": ``--days`` simulated daily runs of a ``--products`` catalog in four categories with
3% churn a day (1% new, 1% changed image, 1% removed), through the real write (features.write_batch),
compact, manifest, index, validate, publish and gc code with ``storage.keep_versions: 3``. Skipped:
the catalog source, download and the model: vectors are a deterministic function of the content
key (engine.synthetic.key_vectors). After the last day, one more day whose changes all fall in one
category of four measures how much of the index is rebuilt.

Part "funnel" lives in bench/scale_funnel.py (``funnel(...)``), when present.

Prints one JSON object per part and a last one with ``"bench": "scale"`` holding every part's fields.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from engine import config, manifest, pointer, synthetic  # noqa: E402
from engine.storage import Storage  # noqa: E402

CATEGORIES = ["tops", "bags", "shoes", "hats"]
REBUILDS = 5
WINDOW = 5  # index stage seconds: mean of the WINDOW days ending on the day measured


def tree_bytes(root: str, *parts: str) -> tuple[int, int]:
    """(files, bytes) of the parquet files under a folder."""
    files = size = 0
    for folder, _, names in os.walk(os.path.join(root, *parts)):
        for n in names:
            if n.endswith(".parquet"):
                files += 1
                size += os.path.getsize(os.path.join(folder, n))
    return files, size


def year(products: int, dim: int, days: int, target_mb: float, seed: int = 0) -> dict:
    import ray

    root = tempfile.mkdtemp(prefix="lookalike-scale-")
    cfg = config.load(None, [f"storage.root={root}", f"embed.dim={dim}", "storage.keep_versions=3",
                             f"features.target_file_mb={target_mb}", "storage.feature_batch_rows=2048",
                             "index.n_trees=10", "index.search_k=2000", "index.validate.sample=100"])
    storage, mv = Storage(root), cfg.embed.model_version
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    churn = synthetic.Churn(products, CATEGORIES, rate=0.01, seed=seed)
    catalog = churn.table()
    index_s, sampled, t0 = [], {}, time.time()
    for day in range(1, days + 1):
        rep = synthetic.daily_run(cfg, catalog, f"d{day:04d}")
        assert rep["validation"]["ok"], rep["validation"]["failures"]
        index_s.append(rep["stages"]["index"]["seconds"])
        if day % 50 == 0:
            print(json.dumps({"part": "year", "progress_day": day, "elapsed_s": round(time.time() - t0, 1)}),
                  file=sys.stderr, flush=True)
        if day in (30, days):
            sampled[day] = _measure(storage, root, mv, dim, index_s)
            sampled[day]["load_avg_1m"] = round(os.getloadavg()[0], 1)
            if day == 30:  # kept aside to re-time its index build beside day 365's (same machine load)
                shutil.copytree(root, root + "-day30")
            print(json.dumps({"part": "year", "day": day, **sampled[day],
                              "elapsed_s": round(time.time() - t0, 1)}), flush=True)
        if day < days:
            catalog = churn.advance()
    rep = synthetic.daily_run(cfg, churn.advance(only="bags"), f"d{days + 1:04d}")
    build = rep["index_build"]
    rebuild = _interleaved_rebuilds(cfg, {30: (root + "-day30", "d0030"), days: (root, f"d{days:04d}")})
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root + "-day30", ignore_errors=True)
    rebuilt = build["shards"] / max(1, build["shards"] + build["shards_reused"])
    d30, dN = sampled[30], sampled[days]
    return {
        "catalog_products": products, "dim": dim, "days": days, "categories": len(CATEGORIES),
        "churn_per_day": {"new": 0.01, "changed": 0.01, "removed": 0.01}, "keep_versions": 3,
        "target_file_mb": target_mb, "vectors": "synthetic.key_vectors(content_key): no download, no model",
        "skipped": ["catalog source", "plan stage", "download", "detect", "embed model"],
        "files_day30": d30["files"], f"files_day{days}": dN["files"],
        "files_day365_over_day30": round(dN["files"] / d30["files"], 3),
        "stored_over_live_vectors_day365": dN["stored_over_live"],
        "stored_over_live_vectors_day30": d30["stored_over_live"],
        "features_bytes_day365": dN["features_bytes"], "manifests_bytes_day365": dN["manifests_bytes"],
        "live_vector_bytes_day365": dN["live_vector_bytes"],
        "index_stage_s_day30": rebuild[30], "index_stage_s_day365": rebuild[days],
        "index_day365_over_day30": round(rebuild[days] / max(rebuild[30], 1e-9), 3),
        "index_stage_s_is": f"median of {REBUILDS} index builds (every category, the index stage's own code) of the "
                            f"day-30 and the day-{days} state, alternated after the year so both see the same "
                            f"machine load",
        "index_stage_s_in_run_day30": d30["index_stage_s"], f"index_stage_s_in_run_day{days}": dN["index_stage_s"],
        "index_stage_s_in_run_is": f"mean of the {WINDOW} daily runs ending on that day, as they ran",
        "load_avg_1m_day30": d30["load_avg_1m"], f"load_avg_1m_day{days}": dN["load_avg_1m"],
        "shards_rebuilt_one_category_day": round(rebuilt, 3),
        "shards_built_one_category_day": build["shards"], "shards_reused_one_category_day": build["shards_reused"],
        "year_s": round(time.time() - t0, 1),
    }


def _interleaved_rebuilds(cfg, stores: dict[int, tuple[str, str]]) -> dict[int, float]:
    """Seconds of index.build_version over each store's published state, alternating stores."""
    from engine import index

    times: dict[int, list[float]] = {day: [] for day in stores}
    states = {day: manifest.read_state(Storage(r), cfg.embed.model_version, v) for day, (r, v) in stores.items()}
    for k in range(REBUILDS):
        for day, (r, v) in stores.items():
            t = time.time()
            index.build_version(Storage(r), cfg.embed.model_version, f"{v}-rebuild-{k}", states[day], cfg.index)
            times[day].append(time.time() - t)
    return {day: round(float(np.median(t)), 3) for day, t in times.items()}


def _measure(storage: Storage, root: str, mv: str, dim: int, index_s: list[float]) -> dict:
    version = pointer.latest(storage, mv)
    live = manifest.read_meta(storage, mv, version)["rows"]
    files, fbytes = tree_bytes(root, "features")
    _, mbytes = tree_bytes(root, "manifests")
    vector_bytes = live * dim * 4
    return {"files": files, "features_bytes": fbytes, "manifests_bytes": mbytes, "live_vector_bytes": vector_bytes,
            "stored_over_live": round((fbytes + mbytes) / vector_bytes, 3),
            "index_stage_s": round(float(np.mean(index_s[-WINDOW:])), 3)}


SHARED = ("skipped", "note", "targets", "state")  # keys both parts have: kept apart in the last line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--target-file-mb", type=float, default=0.25,
                    help="features.target_file_mb for the year (small, so a small catalog has several files)")
    ap.add_argument("--skip-funnel", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    fields = {}
    try:
        from scale_funnel import funnel  # bench/scale_funnel.py
    except ImportError:
        funnel = None
    if funnel is not None and not args.skip_funnel:
        out = funnel()
        print(json.dumps({"part": "funnel", **out}), flush=True)
        fields.update({f"funnel_{k}" if k in SHARED else k: v for k, v in out.items() if k != "bench"})
    out = year(args.products, args.dim, args.days, args.target_file_mb)
    print(json.dumps({"part": "year", **out}), flush=True)
    fields.update({f"year_{k}" if k in SHARED else k: v for k, v in out.items() if k != "bench"})
    fields["parts"] = (["funnel"] if funnel is not None and not args.skip_funnel else []) + ["year"]
    fields["total_s"] = round(time.time() - t0, 1)
    print(json.dumps({"bench": "scale", **fields}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
