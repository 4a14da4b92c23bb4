"""Catalog sources -> a Ray Dataset of Arrow batches with at least product_id, image_url, category.

Row-level problems (a null id, an empty URL) are not errors here: they travel on and become
reject rows with a reason. Only a source that cannot be read at all is an error.
"""
from __future__ import annotations

import os

import pyarrow as pa

from engine.config import SourceConfig
from engine.storage import Storage

CATALOG_FIELDS = ("product_id", "image_url", "category")
# Reading is I/O; a whole CPU per read task would starve the actor pools on a 2-core node.
READ_CPUS = 0.25


class CatalogError(RuntimeError):
    """The catalog cannot be read as a whole (missing file, missing column)."""


def _format(cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext = os.path.splitext(cfg.path.rstrip("/"))[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(ext, "parquet")


def read(cfg: SourceConfig, parallelism: int = -1):
    """The catalog as a Ray Dataset (streamed; nothing is collected on the driver)."""
    if cfg.kind == "bigquery":
        raise CatalogError("source.kind 'bigquery' is not available in this build")
    import ray.data

    storage = Storage(os.path.dirname(cfg.path.rstrip("/")) or ".")
    fs, path = storage.fs, storage.path(os.path.basename(cfg.path.rstrip("/")))
    if not fs.exists(path):
        raise CatalogError(f"source.path {cfg.path!r}: no such file or directory")
    fmt = _format(cfg)
    kw = dict(filesystem=fs, override_num_blocks=parallelism if parallelism > 0 else None,
              num_cpus=READ_CPUS)
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, **kw)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        opts = pcsv.ConvertOptions(column_types={"product_id": pa.string()})
        ds = ray.data.read_csv(path, convert_options=opts, **kw)
    else:
        ds = ray.data.read_json(path, lines=True, **kw)
    missing = [c for c in cfg.required_columns if c not in ds.schema().names]
    if missing:
        raise CatalogError(f"source.path {cfg.path!r}: catalog lacks required column(s) {missing}; "
                           f"it has {ds.schema().names}")
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds


def normalise(batch: pa.Table) -> pa.Table:
    """Required fields as strings (ids may arrive as ints from CSV or BigQuery)."""
    for name in CATALOG_FIELDS:
        col = batch.column(name)
        if col.type != pa.string():
            col = col.cast(pa.string())
            batch = batch.set_column(batch.schema.get_field_index(name), name, col)
    return batch
