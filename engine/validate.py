"""The gate before publish: an index version must prove itself before LATEST moves to it.

Checks (like autofaiss' score_index): every shard loads and matches its checksum; item counts
equal the feature rows written; recall@10 against exact search on a sample of real vectors is
at least the threshold; an item queried with its own vector finds itself.
"""
from __future__ import annotations

import math
import posixpath
import tempfile

import numpy as np
import pyarrow.parquet as pq

from engine import features
from engine.config import ValidateConfig
from engine.index import MANIFEST, IndexLoadError, LoadedIndex, version_prefix
from engine.storage import Storage

K = 10


def feature_counts(storage: Storage, model_version: str, run_id: str) -> dict[str, int]:
    counts = features.counts(storage, model_version, run_id)  # incremental runs: the product manifest
    if counts:
        return counts
    for cat in features.categories(storage, model_version, run_id):
        folder = storage.path(*features.run_prefix(model_version, run_id), f"category={cat}")
        files = [f for f in storage.fs.ls(folder, detail=False) if f.rsplit("/", 1)[-1].startswith("part-")]
        counts[cat] = sum(pq.ParquetFile(f, filesystem=storage.fs).metadata.num_rows for f in files)
    return counts


def _recall(index: LoadedIndex, sample: int, rng: np.random.Generator) -> tuple[float, float, int]:
    """Mean recall@10 vs exact search, self-hit rate, and how many queries were used."""
    total = sum(len(c) for c in index.categories.values()) or 1
    recalls, self_hits = [], []
    for name, cat in index.categories.items():
        n = len(cat)
        vecs = np.stack([index.vector(name, i) for i in range(n)])
        if index.metric == "angular":
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
        m = min(n, max(1, math.ceil(sample * n / total)))  # ceil: at least `sample` in all
        k = min(K, n)
        for q in rng.choice(n, size=m, replace=False):
            if index.metric == "euclidean":
                exact_scores = -np.linalg.norm(vecs - vecs[q], axis=1)
            else:
                exact_scores = vecs @ vecs[q]
            exact = np.argpartition(-exact_scores, k - 1)[:k]
            kth = np.sort(exact_scores[exact])[0]
            got = cat.annoy.get_nns_by_vector(list(map(float, vecs[q])), k, search_k=index.search_k)
            # ties at the k-th score count as hits: any of them is an exact answer
            recalls.append(sum(exact_scores[g] >= kth - 1e-6 for g in got) / k)
            self_hits.append(q in got or exact_scores[got[0]] >= exact_scores[q] - 1e-6 if got else False)
    if not recalls:
        return 0.0, 0.0, 0
    return float(np.mean(recalls)), float(np.mean(self_hits)), len(recalls)


def validate(storage: Storage, model_version: str, index_version: str, cfg: ValidateConfig,
             expected: dict[str, int] | None = None, cache_dir: str | None = None, seed: int = 0) -> dict:
    """Run every check; ``ok`` is True only when all pass. Never raises for a bad index."""
    result = {"model_version": model_version, "index_version": index_version, "ok": False, "failures": []}
    fail = result["failures"].append
    with tempfile.TemporaryDirectory() as tmp:
        try:
            index = LoadedIndex.load(storage, model_version, index_version, cache_dir or tmp, verify=True)
        except IndexLoadError as exc:
            fail(f"load: {exc}")
            return result
        except Exception as exc:  # a corrupt manifest or id map is a failed check, not a crash
            fail(f"load: {type(exc).__name__}: {exc}")
            return result
        result["counts_checked_against"] = "run"
        if expected is None:
            expected = feature_counts(storage, model_version, index.manifest["run_id"])
            result["counts_checked_against"] = "features"
        if not expected:  # an index copied away from its features: the manifest is what we have
            expected = {c: sum(s["count"] for s in e["shards"]) for c, e in index.manifest["categories"].items()}
            result["counts_checked_against"] = "manifest"
        counts = {name: len(c) for name, c in index.categories.items()}
        result["counts"] = counts
        if counts != expected:
            fail(f"counts: index has {counts}, features have {expected}")
        recall, self_hit, n = _recall(index, cfg.sample, np.random.default_rng(seed))
        result.update(recall_at_10=round(recall, 4), self_hit_rate=round(self_hit, 4), sample=n)
        if n == 0:
            fail("recall: the index is empty")
        elif recall < cfg.min_recall_at_10:
            fail(f"recall@10 {recall:.4f} < threshold {cfg.min_recall_at_10}")
        if n and self_hit < 0.99:
            fail(f"self-query: only {self_hit:.2%} of sampled items find themselves")
    result["ok"] = not result["failures"]
    return result


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
    from engine.publish import latest

    root, model_version, index_version = parse_uri(uri)
    storage = Storage(root, storage_options)
    index_version = index_version or latest(storage, model_version)
    if index_version is None:
        return {"ok": False, "failures": [f"{uri}: no LATEST and no index version given"]}
    if not storage.exists(*version_prefix(model_version, index_version), MANIFEST):
        return {"ok": False, "failures": [f"{posixpath.join(root, *version_prefix(model_version, index_version))}: "
                                          f"no such index version"]}
    return validate(storage, model_version, index_version, cfg)
