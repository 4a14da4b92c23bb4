"""Annoy indexes per category: built in parallel as Ray tasks, loaded (mmap) for search.

An index version is a folder ``indexes/<model_version>/<index_version>/`` holding, per
category, ``<category>/shard-000.ann`` and its id map ``shard-000.ids.parquet`` (Annoy item
id -> product_id), plus ``manifest.json`` (counts, dim, params, checksums). Versions are
immutable once written; the LATEST pointer is the only thing that moves (engine.publish).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import features
from engine.config import IndexConfig
from engine.storage import Storage

MANIFEST = "manifest.json"


def version_prefix(model_version: str, index_version: str) -> tuple[str, str, str]:
    return ("indexes", model_version, index_version)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def score_from_distance(distance: np.ndarray | float, metric: str):
    """Annoy distances -> a similarity where higher is better (cosine for angular)."""
    d = np.asarray(distance, dtype=np.float64)
    if metric == "angular":
        return 1.0 - d * d / 2.0
    if metric == "dot":
        return d
    return -d


def build_category(root: str, model_version: str, run_id: str, index_version: str, category: str,
                   params: dict) -> dict:
    """Build one category's index from the run's feature shards and upload it; returns its manifest entry."""
    from annoy import AnnoyIndex

    t0 = time.time()
    storage = Storage.of(root)
    table = features.read_category(storage, model_version, run_id, category)
    vecs = features.vectors(table)
    ids = table.column("product_id").cast(pa.string())
    dim = vecs.shape[1]
    index = AnnoyIndex(dim, params["metric"])
    for i, v in enumerate(vecs):
        index.add_item(i, v)
    index.build(params["n_trees"], n_jobs=1)
    prefix = version_prefix(model_version, index_version) + (category,)
    with tempfile.TemporaryDirectory() as tmp:
        ann, idmap = os.path.join(tmp, "shard-000.ann"), os.path.join(tmp, "shard-000.ids.parquet")
        index.save(ann)
        pq.write_table(pa.table({"annoy_id": pa.array(np.arange(len(ids)), pa.int64()), "product_id": ids}), idmap)
        shard = {"index": "shard-000.ann", "ids": "shard-000.ids.parquet", "count": len(ids),
                 "sha256": sha256(ann), "ids_sha256": sha256(idmap), "bytes": os.path.getsize(ann)}
        storage.put_file(ann, *prefix, shard["index"])
        storage.put_file(idmap, *prefix, shard["ids"])
    return {"category": category, "count": len(ids), "dim": dim, "shards": [shard],
            "build_s": round(time.time() - t0, 3)}


def build(root: str, model_version: str, run_id: str, index_version: str, cfg: IndexConfig) -> dict:
    """Build every category in parallel (one Ray task each) and write the version manifest."""
    import ray

    storage = Storage.of(root)
    params = {"metric": cfg.metric, "n_trees": cfg.n_trees, "search_k": cfg.search_k}
    task = ray.remote(num_cpus=1)(build_category)
    cats = features.categories(storage, model_version, run_id)
    entries = ray.get([task.remote(root, model_version, run_id, index_version, c, params) for c in cats])
    dims = {e["dim"] for e in entries}
    manifest = {
        "model_version": model_version, "index_version": index_version, "run_id": run_id,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "params": params,
        "dim": dims.pop() if len(dims) == 1 else None,
        "categories": {e["category"]: e for e in sorted(entries, key=lambda e: e["category"])},
    }
    storage.write_json(manifest, *version_prefix(model_version, index_version), MANIFEST)
    return manifest


class IndexLoadError(RuntimeError):
    pass


@dataclass
class CategoryIndex:
    annoy: object
    ids: list[str]
    positions: dict[str, int]

    def __len__(self) -> int:
        return len(self.ids)


class LoadedIndex:
    """One index version, every category loaded and mmap'd: what the service searches."""

    def __init__(self, manifest: dict, categories: dict[str, CategoryIndex], verify: bool = True):
        self.manifest = manifest
        self.categories = categories
        self.metric = manifest["params"]["metric"]
        self.search_k = manifest["params"].get("search_k", -1)
        self.dim = manifest["dim"]

    @property
    def version(self) -> str:
        return self.manifest["index_version"]

    @classmethod
    def load(cls, storage: Storage, model_version: str, index_version: str, cache_dir: str,
             verify: bool = True) -> "LoadedIndex":
        """Load from local disk directly, or from a remote root via a local cache (Annoy mmaps files)."""
        from annoy import AnnoyIndex

        prefix = version_prefix(model_version, index_version)
        try:
            manifest = storage.read_json(*prefix, MANIFEST)
        except FileNotFoundError:
            raise IndexLoadError(f"{storage.uri(*prefix)}: no {MANIFEST}") from None
        cats = {}
        for name, entry in manifest["categories"].items():
            for shard in entry["shards"]:
                ann = cls._local(storage, cache_dir, prefix + (name, shard["index"]))
                ids_path = cls._local(storage, cache_dir, prefix + (name, shard["ids"]))
                if verify and sha256(ann) != shard["sha256"]:
                    raise IndexLoadError(f"{name}/{shard['index']}: checksum mismatch (corrupt or truncated file)")
                index = AnnoyIndex(manifest["dim"], manifest["params"]["metric"])
                try:
                    index.load(ann)
                except OSError as exc:
                    raise IndexLoadError(f"{name}/{shard['index']}: cannot load: {exc}") from None
                ids = pq.read_table(ids_path).column("product_id").to_pylist()
                if index.get_n_items() != len(ids) or len(ids) != shard["count"]:
                    raise IndexLoadError(f"{name}: {index.get_n_items()} items in index, {len(ids)} ids, "
                                         f"manifest says {shard['count']}")
                cats[name] = CategoryIndex(index, ids, {pid: i for i, pid in enumerate(ids)})
        return cls(manifest, cats)

    @staticmethod
    def _local(storage: Storage, cache_dir: str, parts: tuple) -> str:
        if storage.is_local:
            return storage.path(*parts)
        target = os.path.join(cache_dir, *parts)
        if not os.path.exists(target):
            tmp = f"{target}.part"
            storage.get_file(tmp, *parts)
            os.replace(tmp, target)
        return target

    def locate(self, product_id: str) -> tuple[str, int] | None:
        for name, cat in self.categories.items():
            pos = cat.positions.get(product_id)
            if pos is not None:
                return name, pos
        return None

    def vector(self, category: str, position: int) -> np.ndarray:
        return np.asarray(self.categories[category].annoy.get_item_vector(position), np.float32)

    def search(self, vector: np.ndarray, k: int, categories: list[str] | None = None,
               exclude: str | None = None) -> list[dict]:
        """Top-k over the given categories (all when None), merged by score, best first."""
        hits = []
        for name in categories or list(self.categories):
            cat = self.categories.get(name)
            if cat is None:
                continue
            n = k + (1 if exclude is not None else 0)
            items, dists = cat.annoy.get_nns_by_vector(list(map(float, vector)), n, search_k=self.search_k,
                                                       include_distances=True)
            scores = score_from_distance(np.array(dists), self.metric)
            hits += [{"product_id": cat.ids[i], "category": name, "score": round(float(s), 6)}
                     for i, s in zip(items, scores) if cat.ids[i] != exclude]
        hits.sort(key=lambda h: -h["score"])
        return hits[:k]

    def summary(self) -> dict:
        m = self.manifest
        return {"model_version": m["model_version"], "index_version": m["index_version"],
                "built_at": m["built_at"], "dim": m["dim"],
                "counts": {name: len(cat) for name, cat in self.categories.items()}}
