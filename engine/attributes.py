"""Filter columns beside the shards: ``<category>/shard-NNN.attrs.parquet`` in every index version.

Each file holds a shard's ``index.filter_columns`` in Annoy position order, taken from the run's
catalog (the plan keeps a projection of every catalog block), so a version's attributes are
today's even where its Annoy files are reused by reference from an older version: a price that
changed since is the new price. Written before the manifest, like everything a version holds.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Storage, sha256

ARROW = {"bool": pa.bool_(), "string": pa.string(), "int": pa.int64(), "float": pa.float64()}
MAX_STRING = 200  # characters of a string attribute kept (longer values are cut)
SUFFIX = ".attrs.parquet"


def project(block: pa.Table, columns: dict[str, str]) -> pa.Table:
    """Ray task: a catalog block -> product_id and the filter columns, typed; a value that does not
    convert (``"abc"`` for a float) becomes null: the row is indexed and matches no filter on it."""
    from engine.catalog import normalise

    ids = normalise(block).column("product_id")
    out = {"product_id": ids}
    for name, kind in columns.items():
        out[name] = _typed(block.column(name), kind) if name in block.column_names else pa.nulls(len(ids), ARROW[kind])
    return pa.table(out)


def _typed(col, kind: str):
    target = ARROW[kind]
    if col.type == target:
        typed = col
    else:
        try:
            typed = col.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            typed = pa.chunked_array([pa.array([_convert(v, kind) for v in col.to_pylist()], target)])
    if kind == "string":
        typed = pc.utf8_slice_codeunits(typed, 0, MAX_STRING)
    return typed


def _convert(value, kind: str):
    text = str(value).strip().lower() if value is not None else None
    try:
        if kind == "bool":
            return {"true": True, "1": True, "false": False, "0": False}.get(text)
        if kind == "int":
            return int(float(text)) if text is not None and float(text).is_integer() else None
        if kind == "float":
            v = float(text)
            return v if np.isfinite(v) else None
        return str(value)
    except (TypeError, ValueError):
        return None


def shard_attributes(ids: pa.Array, catalog: pa.Table, columns: dict[str, str]) -> pa.Table:
    """The filter columns of ``ids`` (a shard's product_ids, Annoy order) from ``catalog``; the
    first catalog row of a product wins (as in the plan), a product not in it gets nulls."""
    where = pc.index_in(ids, value_set=catalog.column("product_id").combine_chunks())
    return pa.table({name: catalog.column(name).combine_chunks().take(where).cast(ARROW[kind])
                     for name, kind in columns.items()})


def write_shard(root, parts: tuple, ids_parts: tuple, refs: list, columns: dict[str, str]) -> dict:
    """Ray task: one shard's attributes file; returns its manifest fields."""
    import ray

    storage = Storage.of(root)
    ids = pq.ParquetFile(storage.path(*ids_parts), filesystem=storage.fs).read(columns=["product_id"])
    ids = ids.column("product_id")
    tables = [t for t in ray.get(list(refs)) if t.num_rows]
    empty = pa.table({"product_id": pa.array([], pa.string()),
                      **{n: pa.array([], ARROW[k]) for n, k in columns.items()}})
    catalog = pa.concat_tables(tables) if tables else empty
    table = shard_attributes(ids.combine_chunks(), catalog, columns)
    name = parts[-1]
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(storage.path(*parts[:-1]) if storage.is_local else tmp, name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        pq.write_table(table, local + ".tmp")
        os.replace(local + ".tmp", local)
        out = {"attrs": name, "attrs_bytes": os.path.getsize(local), "attrs_sha256": sha256(local)}
        if not storage.is_local:
            storage.put_file(local, *parts)
    return out


def write(root, prefix: tuple, categories: dict[str, dict], refs: list, columns: dict[str, str]) -> None:
    """Write every shard's attributes into ``prefix`` (this version), updating the shard entries
    in ``categories`` (copies: a reused entry belongs to an earlier manifest too)."""
    import ray

    if not columns:
        return
    task = ray.remote(num_cpus=0.25)(write_shard)
    jobs = []
    for category, entry in categories.items():
        folder = entry.get("version", prefix[2])
        entry["shards"] = [dict(s) for s in entry["shards"]]
        for shard in entry["shards"]:
            ids_parts = ("indexes", prefix[1], shard.get("version") or folder, category, shard["ids"])
            parts = (*prefix, category, shard["index"].removesuffix(".ann") + SUFFIX)
            jobs.append((shard, task.remote(root, parts, ids_parts, refs, columns)))
        entry["filter_columns"] = dict(columns)
    for shard, ref in jobs:
        shard.update(ray.get(ref), attrs_version=prefix[2])
