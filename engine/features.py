"""Feature store: parquet shards of vectors, partitioned by model version, run and category.

The write stage is the pipeline's commit point: a shard is written under a temporary name
and renamed into place, so a reader (the index build, a resumed run) never sees half a shard.
It emits only small outcome rows (no vectors, no pixels) for the driver to count.
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Storage

OUTCOME_COLUMNS = ["product_id", "image_url", "category", "status", "reason", "detail"]


def run_prefix(model_version: str, run_id: str) -> tuple[str, ...]:
    return ("features", model_version, f"run={run_id}")


def write_batch(batch: pa.Table, root: str, model_version: str, run_id: str) -> pa.Table:
    """Ray Data task: write the batch's ok rows, one shard per category; return every row's outcome."""
    storage = Storage.of(root)
    prefix = run_prefix(model_version, run_id)
    ok = batch.filter(pc.equal(batch.column("status"), "ok"))
    ok = ok.drop_columns([c for c in ("status", "reason", "detail") if c in ok.column_names])
    for category in pc.unique(ok.column("category")).to_pylist():
        _write(storage, prefix, category, ok.filter(pc.equal(ok.column("category"), category)))
    return batch.select(OUTCOME_COLUMNS)


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


def categories(storage: Storage, model_version: str, run_id: str) -> list[str]:
    names = storage.listdir(*run_prefix(model_version, run_id))
    return [n.split("=", 1)[1] for n in names if n.startswith("category=")]


def read_category(storage: Storage, model_version: str, run_id: str, category: str,
                  columns=("product_id", "vector")) -> pa.Table:
    folder = storage.path(*run_prefix(model_version, run_id), f"category={category}")
    files = [f for f in storage.fs.ls(folder, detail=False)
             if f.rsplit("/", 1)[-1].startswith("part-") and f.endswith(".parquet")]
    tables = [pq.read_table(f, columns=list(columns), filesystem=storage.fs) for f in sorted(files)]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def vectors(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)
