"""The gate before publish: an index version must prove itself before LATEST moves to it.

Checks (like autofaiss' score_index): the manifest describes this version; every shard loads, has
its recorded size and checksum, and as many items as its id map; no product appears twice in one
category; item counts equal the feature rows written; recall@10 of the sharded search (the fan-out
and merge the service does) against exact search, on a sample of the index's own vectors, is at
least the threshold; and an item queried with its own vector finds itself.
"""
from __future__ import annotations

import math
import posixpath
import tempfile
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import api, features, manifest
from engine.config import ValidateConfig
from engine.index import MANIFEST, IndexLoadError, LoadedIndex, Shard, merge, read_manifest, version_prefix
from engine.storage import Storage

K = 10
EXACT_BLOCK = 65_536  # rows per matmul block: bounded memory whatever the shard size
TIE = 1e-5


def feature_counts(storage: Storage, model_version: str, index_version: str, run_id: str = "") -> dict[str, int]:
    """Objects per category in the version's product manifest; for an index built from a bare run
    (synthetic stores), the rows of that run's files ({} when neither exists)."""
    meta = manifest.read_meta(storage, model_version, index_version)
    if meta:
        return dict(meta["categories"])
    return {cat: sum(pq.ParquetFile(storage.path(f), filesystem=storage.fs).metadata.num_rows
                     for f in features.run_files(storage, model_version, run_id, cat))
            for cat in features.run_categories(storage, model_version, run_id)} if run_id else {}


def _exact_scores(vecs: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Similarity (higher is better, same order as Annoy's) of every query to every row."""
    v = np.ascontiguousarray(vecs, np.float32)
    if metric == "angular":
        v = v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
        q = queries / (np.linalg.norm(queries, axis=1, keepdims=True) + 1e-12)
        return q @ v.T
    if metric == "dot":
        return queries @ v.T
    return -(np.sum(v * v, axis=1)[None, :] - 2 * queries @ v.T + np.sum(queries * queries, axis=1)[:, None])


def exact_top(shards: list[Shard], queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """Brute-force top-k over all shards of a category: (product_ids per query, k-th best score per query)."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.empty((len(queries), 0), dtype=object)
    for shard in shards:
        vecs, ids = shard.item_vectors(), np.asarray(shard.ids.to_pylist(), dtype=object)
        for lo in range(0, len(shard), EXACT_BLOCK):
            scores = _exact_scores(vecs[lo:lo + EXACT_BLOCK], queries, shard.metric).astype(np.float32)
            take = min(k, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
            best_ids = np.concatenate([best_ids, ids[lo:lo + EXACT_BLOCK][top]], axis=1)
            keep = np.argsort(-best_scores, axis=1)[:, :k]
            best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    kth = best_scores[:, -1] if best_scores.shape[1] else np.full(len(queries), np.inf)
    return [list(row) for row in best_ids], kth


def sharded_search(shards: list[Shard], vector: np.ndarray, k: int) -> list[dict]:
    """What the service answers: every shard's top-k, merged by score."""
    vec = np.asarray(vector, np.float32).tolist()
    return merge([(s.category, *s.search(vec, k)) for s in shards], k)


def category_recall(shards: list[Shard], m: int, rng: np.random.Generator, k: int = K) -> tuple[list, list]:
    """Recall@k and self-hits of ``m`` queries drawn from one category's own items.

    Each query is left out of both answers (it is trivially its own best match); ties at the
    k-th exact score count as hits, since any of them is an exact answer.
    """
    n = sum(len(s) for s in shards)
    picks = np.sort(rng.choice(n, size=m, replace=False))
    starts = np.cumsum([0] + [len(s) for s in shards])
    queries, own = [], []
    for p in picks:
        s = int(np.searchsorted(starts, p, "right") - 1)
        queries.append(shards[s].vector(int(p - starts[s])))
        own.append(shards[s].ids[int(p - starts[s])].as_py())
    queries = np.stack(queries)
    kk = min(k, n - 1)
    exact_ids, kth = exact_top(shards, queries, kk + 1)
    recalls, selfs = [], []
    for q, pid, truth, tie in zip(queries, own, exact_ids, kth):
        got = sharded_search(shards, q, kk + 1)
        selfs.append(bool(got) and _is_duplicate(got, pid))
        truth_set = set(truth) - {pid}
        hits = [h for h in got if h["product_id"] != pid][:kk]
        recalls.append(sum(h["product_id"] in truth_set or h["score"] >= tie - TIE for h in hits) / kk)
    return recalls, selfs


def sample_sizes(counts: dict[str, int], sample: int) -> dict[str, int]:
    """Queries per category, spread by size; categories under two items are not sampled."""
    total = sum(counts.values()) or 1
    return {c: min(n, max(1, math.ceil(sample * n / total))) for c, n in counts.items() if n >= 2}


def _summarise(per: dict[str, tuple[list, list]]) -> dict:
    per_category = {c: {"recall_at_10": round(float(np.mean(r)), 4), "self_hit_rate": round(float(np.mean(h)), 4),
                        "sample": len(r)} for c, (r, h) in per.items()}
    recalls = [x for r, _ in per.values() for x in r]
    selfs = [x for _, h in per.values() for x in h]
    if not recalls:
        return {"recall_at_10": 0.0, "self_hit_rate": 0.0, "sample": 0, "per_category": per_category}
    return {"recall_at_10": round(float(np.mean(recalls)), 4), "self_hit_rate": round(float(np.mean(selfs)), 4),
            "sample": len(recalls), "per_category": per_category}


def recall(index: LoadedIndex, sample: int, rng: np.random.Generator, k: int = K) -> dict:
    """Recall@k of the sharded search vs exact search and self-query hit rate, per category and overall."""
    sizes = sample_sizes(index.counts(), sample)
    return _summarise({c: category_recall(index.categories[c], m, rng, k) for c, m in sizes.items()})


def check_category(root, manifest: dict, category: str, m: int, seed: int, cache_dir: str | None = None) -> dict:
    """Ray task: one category's checks where its shards are (mmap'd in place on a local store; on
    GCS copied to this worker's own temporary dir, never to the driver). Reused shards of an
    earlier version are checked like built ones: sizes, checksums, counts, recall."""
    storage = Storage.of(root)
    out = {"category": category, "load": None, "count": 0, "duplicates": 0, "recall": [], "self": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        try:  # the API's loading path (engine/api.py), as the service and notebooks load it
            loaded = api.load_manifest(storage, manifest, cache_dir or tmp, select=lambda c, _: c == category,
                                       check=False)  # recall below queries every sampled item itself
            shards = loaded.categories.get(category, [])
        except IndexLoadError as exc:
            out["load"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a failed check, not a crash
            out["load"] = f"{type(exc).__name__}: {exc}"
        try:
            if out["load"] is None:
                ids = pa.chunked_array([s.ids for s in shards], pa.string()) if shards else pa.chunked_array([], pa.string())
                out["count"] = len(ids)
                out["duplicates"] = len(ids) - len(pc.unique(ids))
                if m:
                    out["recall"], out["self"] = category_recall(shards, m, _rng(seed, category))
        finally:
            for s in shards:
                s.close()
    return out


def _rng(seed: int, category: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode())])


def _is_duplicate(got: list[dict], pid: str) -> bool:
    """The query is found, at a score equal to the best one (an exact duplicate may come first)."""
    best = got[0]["score"]
    return any(h["product_id"] == pid and h["score"] >= best - TIE for h in got)


def validate(storage: Storage, model_version: str, index_version: str, cfg: ValidateConfig,
             expected: dict[str, int] | None = None, cache_dir: str | None = None, seed: int = 0) -> dict:
    """Run every check; ``ok`` is True only when all pass. Never raises for a bad index.

    One Ray task per category when a Ray cluster is connected (the pipeline), else the same
    function in this process (``lookalike validate`` on one machine).
    """
    t0 = time.time()
    result = {"model_version": model_version, "index_version": index_version, "ok": False, "failures": []}
    fail = result["failures"].append
    try:
        manifest = read_manifest(storage, model_version, index_version)
    except IndexLoadError as exc:
        fail(f"load: {exc}")
        return result
    sizes = sample_sizes({c: e["count"] for c, e in manifest["categories"].items()}, cfg.sample)
    answers = _run_checks(storage, manifest, sizes, seed, cache_dir)
    loads = [a["load"] for a in answers if a["load"]]
    for reason in loads:
        fail(f"load: {reason}")
    if not loads:
        _judge(manifest, answers, storage, cfg, expected, result, fail)
    result["ok"] = not result["failures"]
    result["seconds"] = round(time.time() - t0, 3)
    return result


def _run_checks(storage: Storage, manifest: dict, sizes: dict, seed: int, cache_dir: str | None) -> list[dict]:
    import ray

    cats = sorted(manifest["categories"])
    if not ray.is_initialized():
        return [check_category(storage, manifest, c, sizes.get(c, 0), seed, cache_dir) for c in cats]
    task = ray.remote(check_category)
    ref = ray.put(manifest)
    return ray.get([task.options(num_cpus=0.5, name=f"validate:{c}").remote(storage, ref, c, sizes.get(c, 0), seed) for c in cats])


def _judge(manifest: dict, answers: list[dict], storage: Storage, cfg: ValidateConfig, expected, result: dict,
           fail) -> None:
    for name, entry in manifest["categories"].items():
        if entry.get("count", sum(s["count"] for s in entry["shards"])) != sum(s["count"] for s in entry["shards"]):
            fail(f"manifest: {name} count {entry['count']} is not the sum of its shards")
    result["counts_checked_against"] = "run"
    if expected is None:
        expected = feature_counts(storage, manifest["model_version"], manifest["index_version"],
                                  manifest.get("run_id") or "")
        result["counts_checked_against"] = "features"
    if not expected:  # an index copied away from its features: the manifest is what we have
        expected = {c: sum(s["count"] for s in e["shards"]) for c, e in manifest["categories"].items()}
        result["counts_checked_against"] = "manifest"
    counts = {a["category"]: a["count"] for a in answers}
    result["counts"] = counts
    if counts != expected:
        fail(f"counts: index has {counts}, features have {expected}")
    dupes = {a["category"]: a["duplicates"] for a in answers if a["duplicates"]}
    if dupes:
        fail(f"duplicates: product_ids indexed twice in one category: {dupes}")
    rec = _summarise({a["category"]: (a["recall"], a["self"]) for a in answers if a["recall"]})
    result.update(recall_at_10=rec["recall_at_10"], self_hit_rate=rec["self_hit_rate"], sample=rec["sample"],
                  per_category=rec["per_category"])
    result["reused"] = sorted(c for c, e in manifest["categories"].items() if e.get("version"))
    if rec["sample"] == 0:
        fail("recall: the index has no category with two or more items")
    elif rec["recall_at_10"] < cfg.min_recall_at_10:
        fail(f"recall@10 {rec['recall_at_10']:.4f} < threshold {cfg.min_recall_at_10} "
             f"(raise index.n_trees or index.search_k)")
    if rec["sample"] and rec["self_hit_rate"] < 0.99:
        fail(f"self-query: only {rec['self_hit_rate']:.2%} of sampled items find themselves")


def parse_uri(uri: str) -> tuple[str, str, str | None]:
    """``<root>/indexes/<model_version>[/<index_version>]`` -> (root, model_version, index_version)."""
    parts = uri.rstrip("/").split("/")
    if "indexes" not in parts:
        raise ValueError(f"{uri}: expected <storage root>/indexes/<model_version>[/<index_version>]")
    at = len(parts) - 1 - parts[::-1].index("indexes")
    rest = parts[at + 1:]
    if not 1 <= len(rest) <= 2:
        raise ValueError(f"{uri}: expected <storage root>/indexes/<model_version>[/<index_version>]")
    root = "/".join(parts[:at]) or "/"
    return root, rest[0], rest[1] if len(rest) == 2 else None


def validate_uri(uri: str, cfg: ValidateConfig, storage_options: dict | None = None) -> dict:
    from engine.pointer import latest

    root, model_version, index_version = parse_uri(uri)
    storage = Storage(root, storage_options)
    index_version = index_version or latest(storage, model_version)
    if index_version is None:
        return {"ok": False, "failures": [f"{uri}: no LATEST and no index version given"]}
    if not storage.exists(*version_prefix(model_version, index_version), MANIFEST):
        return {"ok": False, "failures": [f"{posixpath.join(root, *version_prefix(model_version, index_version))}: "
                                          f"no such index version"]}
    return validate(storage, model_version, index_version, cfg)
