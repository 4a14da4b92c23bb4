"""Feature store: parquet files of vectors, partitioned by model version, run and category.

The write stage is the pipeline's commit point: a part is written under a temporary name and
renamed into place, so a reader (the index build, a resumed run) never sees half a file. It emits
only small outcome rows (no vectors, no pixels) for the driver to count; an ok row carries the
``file`` (relative to the storage root) and ``row`` (position in it) where its vector now is.

Layout: ``features/<model_version>/run=<run_id>/category=<category>/part-*.parquet`` (per-batch
parts, as written) and ``features/<model_version>/compacted/category=<category>/<run_id>-*.parquet``
(parts merged by engine/compact.py). Which rows of which files are live is the manifest's business
(engine/manifest.py); this module only writes and lists files.
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import thumbs
from engine.storage import Storage

OUTCOME_COLUMNS = ["product_id", "image_url", "category", "catalog_category", "status", "reason", "detail",
                   "content_key", "action", "file", "row", "object", "objects"]
DROPPED = ("status", "reason", "detail", "action", "file", "row", "catalog_row", "object", "width", "height", "note",
           "thumb")
COMPACTED = "compacted"


def run_prefix(model_version: str, run_id: str) -> tuple[str, ...]:
    return ("features", model_version, f"run={run_id}")


def compacted_prefix(model_version: str, category: str) -> tuple[str, ...]:
    return ("features", model_version, COMPACTED, f"category={category}")


def write_batch(batch: pa.Table, root: str, versions: dict, detect_version: str, run_id: str) -> pa.Table:
    """Ray Data task: write the batch's ok rows, one part per category under its model version
    (``versions``: category -> model version, "" -> the default); return every row's outcome,
    ok rows with the file and row position of their vector."""
    storage = Storage.of(root)
    status = batch.column("status")
    ok_mask = pc.equal(status, "ok")
    n = batch.num_rows
    files = batch.column("file").to_pylist() if "file" in batch.column_names else [None] * n
    rows = batch.column("row").to_pylist() if "row" in batch.column_names else [None] * n
    ok = batch.filter(ok_mask)
    if "thumb" in ok.column_names:  # one thumbnail per product (its first object), in one pack per batch
        first = ok.filter(pc.fill_null(pc.equal(ok.column("object"), 0), True)) if "object" in ok.column_names else ok
        thumbs.write_pack(storage, versions[""], run_id, first.column("product_id").to_pylist(),
                          first.column("content_key").to_pylist(), first.column("thumb").to_pylist())
    ok = ok.drop_columns([c for c in DROPPED if c in ok.column_names])
    at = np.flatnonzero(ok_mask.fill_null(False).to_numpy(zero_copy_only=False))
    cats = ok.column("category").to_pylist()
    for category in dict.fromkeys(cats):
        mv = versions.get(category, versions[""])
        pick = [i for i, c in enumerate(cats) if c == category]
        part = ok.take(pa.array(pick, pa.int64()))
        part = part.append_column("model_version", pa.array([mv] * part.num_rows, pa.string()))
        part = part.append_column("detect_version", pa.array([detect_version] * part.num_rows, pa.string()))
        name = write_part(storage, run_prefix(mv, run_id) + (f"category={category}",), part)
        for position, i in enumerate(pick):
            files[at[i]], rows[at[i]] = name, position
    out = batch.select([c for c in OUTCOME_COLUMNS if c in batch.column_names and c not in ("file", "row")])
    return out.append_column("file", pa.array(files, pa.string())).append_column("row", pa.array(rows, pa.int64()))


def write_part(storage: Storage, prefix: tuple, table: pa.Table, name: str | None = None) -> str:
    """Write one file whole-or-nothing; returns its path relative to the storage root."""
    name = name or f"part-{uuid.uuid4().hex}.parquet"
    storage.makedirs(*prefix)
    target = storage.path(*prefix, name)
    if storage.is_local:
        tmp = storage.path(*prefix, f".{name}.tmp")
        pq.write_table(table, tmp, filesystem=storage.fs, row_group_size=8192)
        storage.fs.mv(tmp, target)
    else:  # an object appears whole when its upload completes
        pq.write_table(table, target, filesystem=storage.fs, row_group_size=8192)
    return "/".join(prefix + (name,))


def run_categories(storage: Storage, model_version: str, run_id: str) -> list[str]:
    names = storage.listdir(*run_prefix(model_version, run_id))
    return [n.split("=", 1)[1] for n in names if n.startswith("category=")]


def run_files(storage: Storage, model_version: str, run_id: str, category: str) -> list[str]:
    """A run's committed parts of one category, relative to the storage root (half-written: never)."""
    prefix = run_prefix(model_version, run_id) + (f"category={category}",)
    return ["/".join(prefix + (n,)) for n in storage.listdir(*prefix)
            if n.startswith("part-") and n.endswith(".parquet")]


def runs(storage: Storage, model_version: str) -> list[str]:
    return [n.split("=", 1)[1] for n in storage.listdir("features", model_version) if n.startswith("run=")]


def vectors(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)
