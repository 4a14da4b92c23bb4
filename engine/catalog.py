"""Catalog sources -> a Ray Dataset of Arrow batches with at least product_id, image_url, category.

Row-level problems (a null id, an empty URL) are not errors here: they travel on and become
reject rows with a reason. Only a source that cannot be read at all is an error, raised on
the driver before any task runs.
"""
from __future__ import annotations

import logging
import os

import pyarrow as pa

from engine.config import SourceConfig
from engine.errors import CatalogError  # noqa: F401 - the catalog's error, raised here and by sources
from engine.storage import Storage

log = logging.getLogger(__name__)
CATALOG_FIELDS = ("product_id", "image_url", "category")
# Reading is I/O; a whole CPU per read task would starve the actor pools on a 2-core node.
READ_CPUS = 0.25


def _format(cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext = os.path.splitext(cfg.path.rstrip("/"))[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(ext, "parquet")


def read(cfg: SourceConfig, parallelism: int = -1, storage_options: dict | None = None, extra: tuple = (),
         optional: tuple = ()):
    """The catalog as a Ray Dataset (streamed; nothing is collected on the driver).

    ``storage_options``: GCS settings for a gs:// ``source.path`` (engine.storage.gcs_options);
    ``extra``: more columns the run needs (``index.filter_columns``), required like the rest;
    ``optional``: columns read when the catalog has them (``serve.display_columns``).
    """
    ds = _read_bigquery(cfg, extra, optional) if cfg.kind == "bigquery" \
        else _read_files(cfg, parallelism, storage_options, extra, optional)
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds


def _read_bigquery(cfg: SourceConfig, extra: tuple = (), optional: tuple = ()):
    import ray.data

    from engine.bigquery import BigQueryStorageDatasource

    return ray.data.read_datasource(BigQueryStorageDatasource(cfg, list(dict.fromkeys([*cfg.required_columns, *extra])),
                                                              optional), num_cpus=READ_CPUS)


def _read_files(cfg: SourceConfig, parallelism: int, storage_options: dict | None, extra: tuple = (),
                optional: tuple = ()):
    import ray.data

    storage = Storage(os.path.dirname(cfg.path.rstrip("/")) or ".", storage_options)
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

        id_col = cfg.columns.get("product_id", "product_id")
        ds = ray.data.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={id_col: pa.string()}), **kw)
    else:
        ds = ray.data.read_json(path, lines=True, **kw)
    names = ds.schema().names
    absent = [c for c in extra if cfg.columns.get(c, c) not in names and c not in cfg.required_columns]
    if absent:
        log.warning("source.path %r has no column(s) %s named by index.filter_columns: indexed as null",
                    cfg.path, absent)
    wanted = {cfg.columns.get(f, f): f for f in dict.fromkeys([*cfg.required_columns, *extra]) if f not in absent}
    for f in optional:
        if cfg.columns.get(f, f) in names:
            wanted.setdefault(cfg.columns.get(f, f), f)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise CatalogError(f"source.path {cfg.path!r}: catalog lacks required column(s) {missing}; "
                           f"it has {names}" + ("; map fields to columns with source.columns" if cfg.columns else ""))
    rename = {c: f for c, f in wanted.items() if c != f}
    return ds.rename_columns(rename) if rename else ds


def normalise(batch: pa.Table) -> pa.Table:
    """Required fields as strings (ids may arrive as ints from CSV or BigQuery)."""
    for name in CATALOG_FIELDS:
        col = batch.column(name)
        if col.type != pa.string():
            col = col.cast(pa.string())
            batch = batch.set_column(batch.schema.get_field_index(name), name, col)
    return batch
