"""Feature store: parquet shards of vectors, partitioned by model version, run and category.

The write stage is the pipeline's commit point: a shard is written under a temporary name
and renamed into place, so a reader (the index build, a resumed run) never sees half a shard.
It emits only small outcome rows (no vectors, no pixels) for the driver to count.
"""
from __future__ import annotations

import collections
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Storage

OUTCOME_COLUMNS = ["product_id", "image_url", "category", "catalog_category", "status", "reason", "detail",
                   "content_key", "action", "source_run", "row", "object", "objects"]
MANIFEST_SCHEMA = pa.schema([(c, pa.int32() if c == "objects" else pa.string()) for c in (
    "product_id", "image_url", "category", "catalog_category", "content_key", "source_run", "model_version",
    "detect_version", "objects")])
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
DROPPED = ("status", "reason", "detail", "action", "source_run", "row", "object", "width", "height")


def run_prefix(model_version: str, run_id: str) -> tuple[str, ...]:
    return ("features", model_version, f"run={run_id}")


def write_batch(batch: pa.Table, root: str, versions: dict, detect_version: str, run_id: str) -> pa.Table:
    """Ray Data task: write the batch's ok rows, one shard per category under its model version
    (``versions``: category -> model version, "" -> the default); return every row's outcome."""
    storage = Storage.of(root)
    ok = batch.filter(pc.equal(batch.column("status"), "ok"))
    ok = ok.drop_columns([c for c in DROPPED if c in ok.column_names])
    for category in pc.unique(ok.column("category")).to_pylist():
        mv = versions.get(category, versions[""])
        rows = ok.filter(pc.equal(ok.column("category"), category))
        rows = rows.append_column("model_version", pa.array([mv] * rows.num_rows, pa.string()))
        rows = rows.append_column("detect_version", pa.array([detect_version] * rows.num_rows, pa.string()))
        _write(storage, run_prefix(mv, run_id), category, rows)
    return batch.select([c for c in OUTCOME_COLUMNS if c in batch.column_names])


def _write(storage: Storage, prefix: tuple, category: str, table: pa.Table) -> None:
    name = f"part-{uuid.uuid4().hex}.parquet"
    storage.makedirs(*prefix, f"category={category}")
    folder = storage.path(*prefix, f"category={category}")
    if not storage.is_local:  # an object appears whole when its upload completes
        pq.write_table(table, f"{folder}/{name}", filesystem=storage.fs)
        return
    tmp = f"{folder}/.{name}.tmp"
    pq.write_table(table, tmp, filesystem=storage.fs)
    storage.fs.mv(tmp, f"{folder}/{name}")


def manifest_path(model_version: str, index_version: str) -> tuple[str, ...]:
    return ("manifests", model_version, f"{index_version}.parquet")


def write_manifest(storage: Storage, model_version: str, index_version: str, table: pa.Table) -> None:
    """The objects an index version holds (one row per product and category) and where each one's
    features live (model version, run id)."""
    parts = manifest_path(model_version, index_version)
    storage.makedirs(*parts[:-1])
    target = storage.path(*parts)
    tmp = f"{target}.tmp"
    pq.write_table(table.select(MANIFEST_COLUMNS).cast(MANIFEST_SCHEMA), tmp, filesystem=storage.fs)
    storage.fs.mv(tmp, target)


def _complete(table: pa.Table, model_version: str) -> pa.Table:
    """Stores written before objects and per-category models: one whole-image object per product."""
    n = table.num_rows
    fill = {"catalog_category": lambda: table.column("category"),
            "model_version": lambda: pa.array([model_version] * n, pa.string()),
            "detect_version": lambda: pa.array(["whole"] * n, pa.string()),
            "objects": lambda: pa.array([1] * n, pa.int32())}
    for name, make in fill.items():
        if name not in table.column_names:
            table = table.append_column(name, make())
    return table


def read_manifest(storage: Storage, model_version: str, index_version: str) -> pa.Table | None:
    parts = manifest_path(model_version, index_version)
    if not storage.exists(*parts):
        return None
    return _complete(pq.read_table(storage.path(*parts), filesystem=storage.fs), model_version)


def runs(storage: Storage, model_version: str) -> list[str]:
    return [n.split("=", 1)[1] for n in storage.listdir("features", model_version) if n.startswith("run=")]


def _shards(storage: Storage, folder: str) -> list[str]:
    return sorted(f for f in storage.fs.ls(folder, detail=False)
                  if f.rsplit("/", 1)[-1].startswith("part-") and f.endswith(".parquet"))


def _run_categories(storage: Storage, model_version: str, run_id: str) -> list[str]:
    names = storage.listdir(*run_prefix(model_version, run_id))
    return [n.split("=", 1)[1] for n in names if n.startswith("category=")]


def _run_files(storage: Storage, model_version: str, run_id: str, category: str) -> list[str]:
    folder = storage.path(*run_prefix(model_version, run_id), f"category={category}")
    return _shards(storage, folder) if storage.fs.exists(folder) else []


def read_run_keys(storage: Storage, model_version: str, run_id: str) -> pa.Table:
    """The plan's state columns of a run's committed shards (no vectors)."""
    from engine.plan import STATE_SCHEMA, empty_state

    tables = []
    for cat in _run_categories(storage, model_version, run_id):
        for f in _run_files(storage, model_version, run_id, cat):
            names = pq.ParquetFile(f, filesystem=storage.fs).schema_arrow.names
            if "content_key" not in names:
                continue
            cols = [c for c in STATE_SCHEMA.names if c in names and c != "source_run"]
            t = _complete(pq.read_table(f, columns=cols, filesystem=storage.fs), model_version)
            tables.append(t.append_column("source_run", pa.array([run_id] * t.num_rows, pa.string()))
                          .select(STATE_SCHEMA.names).cast(STATE_SCHEMA))
    return pa.concat_tables(tables) if tables else empty_state()


def categories(storage: Storage, model_version: str, run_id: str) -> list[str]:
    """Categories of the feature set for ``run_id``: its manifest when it has one, else its own shards."""
    manifest = read_manifest(storage, model_version, run_id)
    if manifest is not None:
        return sorted(pc.unique(manifest.column("category")).to_pylist())
    return _run_categories(storage, model_version, run_id)


def shard_rows(storage: Storage, model_version: str, run_id: str) -> dict[str, list[tuple[str, list | None]]]:
    """The feature set of ``run_id`` per category, as (shard file, rows) pairs.

    ``rows`` is None for "every row" (a run without a product manifest), else the positions in
    the file that belong to the set: incremental runs reuse features that earlier runs stored,
    so the product manifest names, per product, the run whose shard holds its vector. Only
    product_id and content_key are read here, never vectors.
    """
    manifest = read_manifest(storage, model_version, run_id)
    if manifest is None:
        return {cat: [(f, None) for f in _run_files(storage, model_version, run_id, cat)]
                for cat in _run_categories(storage, model_version, run_id)}
    out = {}
    for category in sorted(pc.unique(manifest.column("category")).to_pylist()):
        wanted = manifest.filter(pc.equal(manifest.column("category"), category))
        want = set(zip(wanted.column("product_id").to_pylist(), wanted.column("content_key").to_pylist()))
        seen, files = set(), []
        for mv, source in sorted(set(zip(wanted.column("model_version").to_pylist(),
                                         wanted.column("source_run").to_pylist()))):
            paths = _run_files(storage, mv, source, category)
            if not paths:
                raise FileNotFoundError(f"features of run {source} for category {category} ({mv}) are missing")
            for path in paths:
                keys = pq.read_table(path, columns=["product_id", "content_key"], filesystem=storage.fs)
                rows = []
                for i, key in enumerate(zip(keys.column("product_id").to_pylist(),
                                            keys.column("content_key").to_pylist())):
                    if key in want and key[0] not in seen:
                        seen.add(key[0])
                        rows.append(i)
                if rows:
                    files.append((path, rows))
        if len(seen) != wanted.num_rows:
            raise ValueError(f"category {category}: manifest lists {wanted.num_rows} products, "
                             f"{len(seen)} have stored features")
        out[category] = files
    return out


def model_versions(storage: Storage, model_version: str, run_id: str) -> dict[str, str]:
    """category -> the model version of its features in ``run_id``'s feature set."""
    manifest = read_manifest(storage, model_version, run_id)
    if manifest is None:
        return {c: model_version for c in _run_categories(storage, model_version, run_id)}
    pairs = set(zip(manifest.column("category").to_pylist(), manifest.column("model_version").to_pylist()))
    out: dict[str, str] = {}
    for cat, mv in sorted(pairs):
        if out.setdefault(cat, mv) != mv:
            raise ValueError(f"category {cat} mixes features of model versions {out[cat]} and {mv}")
    return out


def read_category(storage: Storage, model_version: str, run_id: str, category: str,
                  columns=("product_id", "vector")) -> pa.Table:
    """A category's (product_id, vector, ...) for ``run_id``'s feature set (see ``shard_rows``)."""
    parts = []
    for path, rows in shard_rows(storage, model_version, run_id).get(category, []):
        table = pq.read_table(path, columns=list(columns), filesystem=storage.fs)
        parts.append(table if rows is None else table.take(pa.array(rows, pa.int64())))
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({c: [] for c in columns})


def counts(storage: Storage, model_version: str, run_id: str) -> dict[str, int]:
    manifest = read_manifest(storage, model_version, run_id)
    if manifest is None:
        return {}
    return dict(collections.Counter(manifest.column("category").to_pylist()))


def vectors(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)
