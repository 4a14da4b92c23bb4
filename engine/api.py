"""The public Python API: open a published index, ask it for neighbours, read its vectors, and read
a run's report and rejected rows as Arrow tables. For notebooks and scripts; the search service
(serve/searcher.py) and the validation gate (engine/validate.py) load indexes through
``load_manifest`` here too, so what a notebook sees is what is served and what was checked.

    from engine import api
    with api.open_index("gs://bucket/lookalike") as ix:      # LATEST of the only index line
        ix.neighbours("p000123", k=10)                       # what GET /similar/p000123 answers
        ids, vecs = ix.vectors("tops")                       # pa.StringArray, (n, dim) float32
    api.read_rejects("gs://bucket/lookalike").group_by("reason").aggregate([("reason", "count")])
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import pointer
from engine.catalog import REJECT_SCHEMA
from engine.index import IndexLoadError, LoadedIndex, category_version, merge, read_manifest
from engine.storage import Storage

__all__ = ["Index", "IndexLoadError", "open_index", "load_manifest", "self_check", "read_report", "read_rejects",
           "runs"]


# ---------------------------------------------------------------- loading (shared with the service and the gate)


def self_check(index: LoadedIndex) -> None:
    """Each shard, queried with one of its own items, must find it: the file is what it claims."""
    for (cat, number), shard in index.shards.items():
        if not len(shard):
            continue
        pos = len(shard) // 2
        own = shard.ids[pos].as_py()
        if own not in shard.search(shard.vector(pos).tolist(), 10)[0]:  # 10: exact duplicates may come first
            raise IndexLoadError(f"{cat}/shard {number}: item {own!r} queried with its own vector is not found")


def load_manifest(storage: Storage, manifest: dict, cache_dir: str, verify: bool = True, select=None,
                  check: bool = True) -> LoadedIndex:
    """The shards of one index version (those where ``select(category, shard)`` when given), sizes and
    checksums verified, and with ``check`` each shard's self-query; IndexLoadError says what is wrong."""
    index = LoadedIndex.from_manifest(storage, manifest, cache_dir, verify, select)
    if check:
        try:
            self_check(index)
        except BaseException:
            index.close()
            raise
    return index


# ---------------------------------------------------------------- the public index


class Index:
    """One published index version, opened read-only. Hits are dicts like the service's results:
    ``{"product_id", "category", "score"}``, best first (score: cosine for the angular metric)."""

    def __init__(self, loaded: LoadedIndex, storage: Storage, own_cache: str | None = None):
        self._loaded, self.storage, self._own_cache = loaded, storage, own_cache

    @property
    def version(self) -> str:
        return self._loaded.version

    @property
    def model_version(self) -> str:
        return self._loaded.manifest["model_version"]

    @property
    def manifest(self) -> dict:
        return self._loaded.manifest

    @property
    def dim(self) -> int:
        return self._loaded.dim

    @property
    def categories(self) -> list[str]:
        return sorted(self._loaded.categories)

    def counts(self) -> dict[str, int]:
        return dict(sorted(self._loaded.counts().items()))

    def summary(self) -> dict:
        return self._loaded.summary()

    def locate(self, product_id: str, category: str | None = None) -> tuple[str, np.ndarray]:
        """(category, vector) of a product: in ``category`` when given, else its own category."""
        loc = self._loaded.locate(product_id, [category] if category else None)
        if loc is None or (category and loc.category != category):
            where = f" in {category}" if category else ""
            raise KeyError(f"product_id {product_id!r} is not in index {self.version}{where}")
        return loc.category, self._loaded.vector(loc)

    def neighbours(self, product_id: str, k: int = 10, category: str | None = None,
                   search_k: int | None = None) -> list[dict]:
        """The k nearest other products, from the product's own category (or ``category``), as the
        service's GET /similar answers (the product itself left out)."""
        cat, vector = self.locate(product_id, category)
        return self.neighbours_of_vector(vector, k, [cat], search_k=search_k, exclude=product_id)

    def neighbours_of_vector(self, vector, k: int = 10, categories: list[str] | None = None,
                             search_k: int | None = None, exact: bool = False,
                             exclude: str | None = None) -> list[dict]:
        """Top-k over ``categories`` (all when None): every shard asked, merged by score. ``search_k``
        overrides the index's per-category value (more is slower and closer to exact); ``exact``
        scans every vector instead (the ground truth recall is measured against)."""
        vec = np.asarray(vector, np.float32).reshape(-1)
        if vec.shape != (self.dim,):
            raise ValueError(f"a query vector has {self.dim} dimensions, not {vec.shape[0]}")
        cats = list(categories) if categories else self.categories
        unknown = [c for c in cats if c not in self._loaded.categories]
        if unknown:
            raise KeyError(f"no categories {unknown} in index {self.version} (it has {self.categories})")
        models = {category_version(self.manifest, c) for c in cats}
        if len(models) > 1:
            raise ValueError(f"categories {cats} hold vectors of different models {sorted(models)}: ask separately")
        n = k + (exclude is not None)
        parts = []
        for c in cats:
            for shard in self._loaded.categories[c]:
                if exact:
                    ids, scores = shard.exact(vec, n, np.arange(len(shard)))
                else:
                    ids, scores = shard.search(vec.tolist(), n, search_k)
                parts.append((c, ids, scores))
        return merge(parts, k, exclude)

    def vectors(self, category: str) -> tuple[pa.Array, np.ndarray]:
        """(product ids, (n, dim) float32 vectors) of one category, in the same order; the vectors
        are a copy, so they outlive ``close``."""
        if category not in self._loaded.categories:
            raise KeyError(f"no category {category!r} in index {self.version} (it has {self.categories})")
        shards = self._loaded.categories[category]
        ids = pa.concat_arrays([s.ids for s in shards]) if shards else pa.array([], pa.string())
        vecs = np.concatenate([np.asarray(s.item_vectors(), np.float32) for s in shards]) if shards \
            else np.zeros((0, self.dim), np.float32)
        return ids, np.ascontiguousarray(vecs)

    def close(self) -> None:
        self._loaded.close()
        if self._own_cache:
            shutil.rmtree(self._own_cache, ignore_errors=True)
            self._own_cache = None

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Index {self.model_version}/{self.version} {self.counts()}>"


def _storage(root: str | Storage, storage_options: dict | None) -> Storage:
    if isinstance(root, Storage):
        return root
    local = "://" not in root or root.startswith("file://")
    if local and not os.path.isdir(root.removeprefix("file://")):
        raise FileNotFoundError(f"{root}: no such storage root")
    return Storage(root, storage_options)


def model_versions(root: str | Storage, storage_options: dict | None = None) -> list[str]:
    """The index lines (model versions) under a storage root that have a published version."""
    storage = _storage(root, storage_options)
    return [m for m in storage.listdir("indexes") if storage.exists("indexes", m, pointer.POINTER)]


def open_index(root: str | Storage, model_version: str | None = None, index_version: str | None = None,
               storage_options: dict | None = None, cache_dir: str | None = None, verify: bool = True) -> Index:
    """Open the published (LATEST) version of an index line, or ``index_version``.

    ``model_version`` may be left out when the root holds one index line. On GCS the shards are
    copied to ``cache_dir`` (a temporary folder removed by ``close`` when not given), since Annoy
    mmaps local files; a local store is mapped in place. ``storage_options``: gcsfs options
    (``engine.storage.gcs_options`` of a config's storage section, for an emulator or a key file).
    """
    storage = _storage(root, storage_options)
    if model_version is None:
        lines = model_versions(storage)
        if len(lines) != 1:
            raise ValueError(f"{storage.uri('indexes')}: {'no published index line' if not lines else 'index lines ' + ', '.join(lines)}"
                             f"; name one as model_version")
        model_version = lines[0]
    if index_version is None:
        index_version = pointer.latest(storage, model_version)
        if index_version is None:
            raise IndexLoadError(f"{storage.uri('indexes', model_version)}: nothing published (no LATEST)")
    manifest = read_manifest(storage, model_version, index_version)
    own = None
    if cache_dir is None and not storage.is_local:
        cache_dir = own = tempfile.mkdtemp(prefix="lookalike-index-")
    try:
        loaded = load_manifest(storage, manifest, cache_dir or "", verify)  # local: mapped in place
    except BaseException:
        if own:
            shutil.rmtree(own, ignore_errors=True)
        raise
    return Index(loaded, storage, own)


# ---------------------------------------------------------------- runs: report and rejects


def runs(root: str | Storage, storage_options: dict | None = None) -> list[str]:
    """Run ids with a report, oldest first (by the report's start time, then id)."""
    storage = _storage(root, storage_options)
    found = []
    for run_id in storage.listdir("runs"):
        try:
            started = storage.read_json("runs", run_id, "report.json").get("started_at") or ""
        except (FileNotFoundError, ValueError):
            continue
        found.append((started, run_id))
    return [r for _, r in sorted(found)]


def _run_id(storage: Storage, run_id: str | None) -> str:
    if run_id is not None:
        return run_id
    found = runs(storage)
    if not found:
        raise FileNotFoundError(f"{storage.uri('runs')}: no run reports")
    return found[-1]


def _flatten(obj: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted columns; lists as JSON text (one row, whatever a report holds)."""
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


def read_report(root: str | Storage, run_id: str | None = None, storage_options: dict | None = None) -> pa.Table:
    """A run's report (``runs/<run_id>/report.json``; the latest run when None) as a one-row table
    with dotted columns (``counts.ok``, ``rejects_by_reason.fetch_error``, ``stages.embed.seconds``...);
    the whole report as JSON in the schema metadata under ``report``."""
    storage = _storage(root, storage_options)
    run_id = _run_id(storage, run_id)
    try:
        report = storage.read_json("runs", run_id, "report.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.uri('runs', run_id, 'report.json')}: no such run report") from None
    table = pa.Table.from_pylist([_flatten(report)])
    return table.replace_schema_metadata({"report": json.dumps(report, default=str)})


def report_dict(table: pa.Table) -> dict:
    """The report behind a ``read_report`` table, as written."""
    return json.loads(table.schema.metadata[b"report"])


def read_rejects(root: str | Storage, run_id: str | None = None, storage_options: dict | None = None) -> pa.Table:
    """A run's rejected rows (product_id, image_url, category, reason, detail); the latest run when
    None. A run that ended before writing any has none."""
    storage = _storage(root, storage_options)
    run_id = _run_id(storage, run_id)
    if not storage.exists("runs", run_id, "rejects.parquet"):
        if not storage.exists("runs", run_id):
            raise FileNotFoundError(f"{storage.uri('runs', run_id)}: no such run")
        return REJECT_SCHEMA.empty_table()
    return pq.ParquetFile(storage.path("runs", run_id, "rejects.parquet"), filesystem=storage.fs).read()
