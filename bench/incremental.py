"""Full run vs a 1% diff run on the shipped 10k catalog, both on one already started Ray cluster.

    python bench/incremental.py [--products 10000] [--change 0.01]

Prints JSON lines; the last is {"bench": "incremental", "full_s", "diff_1pct_s", "diff_vs_full", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine import config, pipeline, raycluster, sample  # noqa: E402


def change_catalog(rows: list[dict], out: Path, share: float, seed: int = 0) -> tuple[list[dict], dict]:
    """Replace `share` of the rows: a third new products, a third new images, a third deleted."""
    rng = np.random.default_rng(seed)
    n = max(3, int(len(rows) * share))
    picks = rng.choice(len(rows), size=n, replace=False)
    deleted, changed = set(picks[: n // 3]), picks[n // 3: 2 * n // 3]
    images, labels = sample.load()
    rows = [dict(r) for r in rows]
    for i in changed:
        r = rows[i]
        path = out / "images" / f"{r['product_id']}-v2.png"
        sample.render(np.fliplr(images[int(r["product_id"][3:])])).save(path)
        r["image_url"], r["updated_at"] = path.as_uri(), "2026-11-25T00:00:00Z"
    kept = [r for i, r in enumerate(rows) if i not in deleted]
    taken = {int(r["product_id"][3:]) for r in rows}
    free = [i for i in range(len(images)) if i not in taken]
    added = n - len(deleted) - len(changed)
    for j in range(added):
        src = free[j] if j < len(free) else int(rng.integers(len(images)))
        pid = f"new-{j:05d}"
        path = out / "images" / f"{pid}.png"
        sample.render(images[src]).save(path)
        label = sample.LABELS[labels[src]]
        kept.append({"product_id": pid, "image_url": path.as_uri(), "category": sample.CATEGORY[label],
                     "label": label, "updated_at": "2026-11-25T00:00:00Z"})
    return kept, {"deleted": len(deleted), "changed": len(changed), "added": added}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, default=10000)
    ap.add_argument("--change", type=float, default=0.01)
    args = ap.parse_args()
    os.environ.update(raycluster.loopback_env())
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        out = Path(tmp)
        path = sample.make_catalog(out / "catalog", args.products)
        base = [f"source.path={path}", f"storage.root={out / 'store'}", f"serve.cache_dir={out / 'cache'}"]
        cfg = config.load(None, base)
        raycluster.connect(cfg.ray)
        t = time.monotonic()
        full = pipeline.run(cfg)
        full_s = time.monotonic() - t
        print(json.dumps({"bench": "incremental_full", "seconds": round(full_s, 1), "counts": full["counts"]}))
        rows, change = change_catalog(pq.read_table(path).to_pylist(), out / "catalog", args.change)
        day2 = out / "catalog" / "day2.parquet"
        pq.write_table(pa.Table.from_pylist(rows), day2)
        t = time.monotonic()
        diff = pipeline.run(config.load(None, base + [f"source.path={day2}"]))
        diff_s = time.monotonic() - t
        c = diff["counts"]
        print(json.dumps({
            "bench": "incremental", "products": args.products, "change": change,
            "full_s": round(full_s, 1), "diff_1pct_s": round(diff_s, 1), "diff_vs_full": round(diff_s / full_s, 4),
            "full_processed": full["counts"]["processed"], "diff_processed": c["processed"],
            "diff_reused": c["unchanged_reused"], "diff_removed": c["removed"], "diff_indexed": c["indexed"],
            "stages_full": {k: v["seconds"] for k, v in full["stages"].items()},
            "stages_diff": {k: v["seconds"] for k, v in diff["stages"].items()},
            "compute_diff": diff.get("compute"), "plan_diff": diff.get("plan", {}).get("seconds"),
            "compute_full": (full.get("compute") or {}).get("mode"),
            "compaction_diff": diff.get("compaction"), "manifest_diff": diff.get("manifest"),
        }))


if __name__ == "__main__":
    main()
