"""Part "funnel" of bench/scale.py: the real plan and bookkeeping of a daily run at 300k and 3M rows.

    python bench/scale_funnel.py [--sizes 300000,3000000]

A synthetic catalog (ids, URLs, categories, updated_at -> content keys) and a published previous
state where 97% of rows are unchanged (1% changed image, 1% new, 1% removed) go through
pipeline.make_plan (hash buckets, columnar join) and pipeline._consume (counts, rejects.parquet,
this run's manifest rows). Skipped: downloads, detection, embedding and the feature write (a
stand-in Ray Data stage marks every work row ok), and everything after the stream (manifest,
index, validation, publish). Each size runs in its own driver process on its own local Ray
cluster; the driver's peak RSS is its getrusage maximum, the workers' the largest RSS sampled
(every 0.1 s, /proc VmHWM) over the cluster's worker processes, or reported by a plan task itself.
Prints one JSON line per size and a last {"bench": "scale_funnel", ...} line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

CHUNK = 100_000  # rows generated and written at a time (one catalog file, one manifest row group)
CATEGORIES = ("tops", "bottoms", "shoes", "bags")
BASE_RUN = "20260101T000000Z-base00"
NOTIONAL_FILE_BYTES = 256 << 20  # full-size feature files: compaction has nothing to merge
SKIPPED = ["download", "detect", "embed", "feature write (stand-in marks work rows ok)",
           "index, validate, publish (the manifest commit runs: the next state read from the chain, "
           "compaction's choice, the delta write)"]


def generate(rows: int, out: Path) -> None:
    """Catalog files and the published state (a manifest base, engine/manifest.py's layout), a
    chunk at a time (this process stays small). The state's ``file``/``row`` name feature files
    that are not written: nothing after the plan reads vectors here."""
    from engine import config, manifest, plan

    cfg = config.load(None, [f"source.path={out / 'catalog'}", f"storage.root={out / 'store'}"])
    mv, dv = cfg.embed.model_version, cfg.detect.signature()
    (out / "catalog").mkdir(parents=True)
    folder = out / "store" / Path(*manifest.folder(mv, BASE_RUN))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    total, categories, files = 0, {c: 0 for c in CATEGORIES}, {}
    with pq.ParquetWriter(folder / "added.parquet", manifest.STATE_SCHEMA) as added:
        for start in range(0, rows, CHUNK):
            ids = np.arange(start, min(rows, start + CHUNK))
            fate = rng.random(len(ids))  # < .01 changed image, < .02 new product, < .03 removed product
            pids = [f"p{i:09d}" for i in ids]
            urls = [f"http://127.0.0.1:9/img/{i}.jpg" for i in ids]
            cats = [CATEGORIES[i % 4] for i in ids]
            stamps = ["2026-11-30T00:00:00Z"] * len(ids)
            keys = [plan.content_key(u, s) for u, s in zip(urls, stamps)]
            old = [f"old-{k}" if f < 0.01 else k for k, f in zip(keys, fate)]
            in_catalog, in_state = (fate < 0.02) | (fate >= 0.03), (fate < 0.01) | (fate >= 0.02)
            take = np.flatnonzero(in_catalog)
            pq.write_table(pa.table({"product_id": [pids[i] for i in take], "image_url": [urls[i] for i in take],
                                     "category": [cats[i] for i in take], "updated_at": [stamps[i] for i in take]}),
                           out / "catalog" / f"part-{start // CHUNK:05d}.parquet")
            state = np.flatnonzero(in_state)
            n = len(state)
            in_cat = np.array([cats[i] for i in state])
            row = np.zeros(n, np.int64)  # position in its category's (notional) feature part of this chunk
            for c in CATEGORIES:
                at = in_cat == c
                row[at] = np.arange(at.sum())
                name = f"features/{mv}/run={BASE_RUN}/category={c}/part-{start // CHUNK:05d}.parquet"
                files[name] = {"rows": int(at.sum()), "live": int(at.sum()), "bytes": NOTIONAL_FILE_BYTES}
                categories[c] += int(at.sum())
            file = [f"features/{mv}/run={BASE_RUN}/category={c}/part-{start // CHUNK:05d}.parquet" for c in in_cat]
            total += n
            added.write_table(pa.table({
                "product_id": [pids[i] for i in state], "content_key": [old[i] for i in state],
                "category": [cats[i] for i in state], "catalog_category": [cats[i] for i in state],
                "model_version": [mv] * n, "detect_version": [dv] * n, "objects": pa.array(np.ones(n, np.int32)),
                "image_url": [urls[i] for i in state], "file": file, "row": pa.array(row, pa.int64())},
                schema=manifest.STATE_SCHEMA))
    pq.write_table(manifest.REMOVED_SCHEMA.empty_table(), folder / "removed.parquet")
    meta = {"version": BASE_RUN, "base": None, "chain": [BASE_RUN], "rows": total, "base_rows": total,
            "delta_rows": 0, "added": 0, "removed": 0, "categories": categories, "files": files}
    (folder / manifest.META).write_text(json.dumps(meta))
    pointer = out / "store" / "indexes" / mv / "LATEST"
    pointer.parent.mkdir(parents=True)
    pointer.write_text(BASE_RUN + "\n")


class WorkerSampler(threading.Thread):
    """Memory of this driver's Ray worker processes ("ray::..." titles), read from /proc every
    ``every_s``: ``peak``, the largest VmHWM (peak RSS, including object-store pages the worker
    mapped: shared, spillable, counted once per worker that touches them) and ``private``, the
    largest sampled RssAnon + RssFile (its RSS less the object store's shared pages)."""

    def __init__(self, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak, self.private, self.stop = every_s, 0, 0, threading.Event()
        self.by_title: dict[str, int] = {}  # worker title (what it ran when sampled) -> largest ``private`` MiB

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if not title.startswith(b"ray::"):
                        continue
                    title = title.split(b"\0")[0].decode(errors="replace")[:60]
                    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                                  if ":" in line)
                    kib = {k: int(status[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile") if k in status}
                    self.peak = max(self.peak, kib.get("VmHWM", 0) * 1024)
                    own = (kib.get("RssAnon", 0) + kib.get("RssFile", 0)) * 1024
                    self.private = max(self.private, own)
                    self.by_title[title] = max(self.by_title.get(title, 0), own // 2**20)
                except OSError:
                    pass
            self.stop.wait(self.every)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stand_in(batch: pa.Table, file: str) -> pa.Table:
    """Download, detect, embed and write skipped: every work row comes back ok, in ``file``."""
    n = batch.num_rows
    for name, value in (("status", "ok"), ("reason", None), ("detail", None), ("file", file)):
        batch = batch.append_column(name, pa.array([value] * n, pa.string()))
    return batch.append_column("row", pa.array(np.arange(n, dtype=np.int64)))


def measure(rows: int, out: Path) -> dict:
    """In a fresh driver: the real plan and bookkeeping over the generated data."""
    import ray

    from engine import config, pipeline, publish, raycluster
    from engine.report import Report
    from engine.storage import Storage

    cfg = config.load(None, [f"source.path={out / 'catalog'}", f"storage.root={out / 'store'}"])
    storage = Storage.from_config(cfg.storage)
    raycluster.connect(cfg.ray)
    sampler = WorkerSampler()
    sampler.start()
    run_id = pipeline.new_run_id()
    report = Report(run_id, cfg.embed.model_version, storage)
    t = time.monotonic()
    detect_version = cfg.detect.signature()
    change = pipeline.make_plan(cfg, storage, run_id, detect_version)
    plan_s = time.monotonic() - t
    pipeline.start_counts(report, change)
    t = time.monotonic()
    batches = ()
    mv = cfg.embed.model_version
    stand_in = f"features/{mv}/run={run_id}/category=all/part-00000.parquet"
    if change.work:
        batches = ray.data.from_arrow_refs(change.work).map_batches(
            _stand_in, fn_kwargs={"file": stand_in}, batch_format="pyarrow").iter_batches(batch_format="pyarrow",
                                                                                          batch_size=None)
    added, again = pipeline._consume(batches, report, storage, run_id, cfg, detect_version, change)
    counts = report.data["counts"]
    counts["removed"] = pipeline._removed(change, again)
    categories = pipeline._categories(change, added)
    removed_rows = sum(t.num_rows for t in ray.get(change.removed))
    book_s = time.monotonic() - t
    # The manifest commit (next state, compaction's choice, delta write) on the driver, as finish runs
    # it; the stand-in feature file only needs its row count (its footer is all the commit reads).
    storage.makedirs(*stand_in.split("/")[:-1])
    pq.write_table(pa.table({"row": np.arange(max(added.num_rows, 1), dtype=np.int64)}), storage.path(stand_in))
    t = time.monotonic()
    resumed, leaving = pipeline._change(change)
    base = publish.read_pointer(storage, mv)
    _, meta = pipeline.commit_manifest(storage, cfg, report, run_id, base.version,
                                       pa.concat_tables([added, resumed]), leaving)
    commit_s = time.monotonic() - t
    sampler.stop.set()
    sampler.join()
    worker = max(sampler.peak / 2**20, *change.peak_rss_mb.values())
    from engine.plan import peak_rss_mb

    return {"bench": "scale_funnel_size", "rows": rows, "buckets": change.buckets, "plan_s": round(plan_s, 2),
            "bookkeeping_s": round(book_s, 2), "manifest_commit_s": round(commit_s, 2),
            "manifest_delta": {k: meta[k] for k in ("rows", "added", "removed")}, "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            "max_worker_peak_rss_mb": round(worker, 1),
            "max_worker_private_rss_mb": round(sampler.private / 2**20, 1),
            "worker_peak_reported_mb": {k: round(v, 1) for k, v in change.peak_rss_mb.items()},
            "worker_private_mb_by_task": dict(sorted(sampler.by_title.items(), key=lambda kv: -kv[1])[:4]),
            "counts": counts, "added_rows": added.num_rows, "manifest_removed_rows": removed_rows,
            "categories": categories}


def _child(mode: str, rows: int, out: Path) -> dict | None:
    env = {**os.environ}
    from engine import raycluster

    env.update(raycluster.loopback_env())
    proc = subprocess.run([sys.executable, __file__, f"--{mode}", str(rows), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} {rows}: {proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def funnel(sizes: tuple[int, ...] = (300_000, 3_000_000), workdir: str | None = None) -> dict:
    """The part's fields (see the module docstring); also prints each size's JSON line."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="lookalike-funnel-", dir=workdir) as tmp:
        for rows in sizes:
            out = Path(tmp) / str(rows)
            t = time.monotonic()
            _child("generate", rows, out)
            gen_s = time.monotonic() - t
            res = _child("measure", rows, out)
            res["generate_s"] = round(gen_s, 1)
            print(json.dumps(res), flush=True)
            results[rows] = res
    lo, hi = min(sizes), max(sizes)
    peak = {n: max(r["driver_peak_rss_mb"], r["max_worker_peak_rss_mb"]) for n, r in results.items()}
    slope = (peak[hi] - peak[lo]) * 2**20 / (hi - lo) if hi > lo else None
    own = {n: max(r["driver_peak_rss_mb"], r["max_worker_private_rss_mb"]) for n, r in results.items()}
    own_slope = (own[hi] - own[lo]) * 2**20 / (hi - lo) if hi > lo else None
    tag = "3m" if hi == 3_000_000 else str(hi)
    return {"bench": "scale_funnel", "sizes": list(sizes), f"plan_s_{tag}": results[hi]["plan_s"],
            f"bookkeeping_s_{tag}": results[hi]["bookkeeping_s"],
            f"manifest_commit_s_{tag}": results[hi]["manifest_commit_s"],
            f"driver_peak_rss_mb_{tag}": results[hi]["driver_peak_rss_mb"],
            f"max_worker_peak_rss_mb_{tag}": results[hi]["max_worker_peak_rss_mb"],
            f"max_worker_private_rss_mb_{tag}": results[hi]["max_worker_private_rss_mb"],
            "bytes_per_row": round(slope, 1) if slope is not None else None,
            "bytes_per_row_private": round(own_slope, 1) if own_slope is not None else None,
            "note": "bytes_per_row: slope of max(driver, worker) peak RSS (VmHWM), which counts in every worker "
                    "the shared object-store pages it ever mapped; _private: the same without those pages "
                    "(RssAnon + RssFile, sampled every 0.1 s)",
            "targets": {"bytes_per_row": 250, f"driver_peak_rss_mb_{tag}": 2048},
            "state": "97% unchanged, 1% changed image, 1% new, 1% removed", "skipped": SKIPPED}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="300000,3000000")
    ap.add_argument("--generate", nargs=2)
    ap.add_argument("--measure", nargs=2)
    args = ap.parse_args()
    if args.generate:
        generate(int(args.generate[0]), Path(args.generate[1]))
    elif args.measure:
        print(json.dumps(measure(int(args.measure[0]), Path(args.measure[1]))))
    else:
        print(json.dumps(funnel(tuple(int(s) for s in args.sizes.split(",")))))


if __name__ == "__main__":
    main()
