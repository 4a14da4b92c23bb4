"""Tombstones: products an index version must no longer answer with, published beside it.

``indexes/<model_version>/<index_version>/tombstones/<stamp>-<random>.parquet``, each written
once under a fresh name (a local write goes to a temporary name and is renamed; a GCS object
appears whole), so concurrent writers never overwrite each other and the listing of the folder
is the set. A row ``(product_id, before, content_key)`` masks the product in every shard whose
delta generation (engine.index.generation) is below ``before``:

- ``lookalike delete`` writes ``before = ALL`` (every shard) with the product's stored
  content_key, so the next daily run can tell "still in the catalog as it was" (dropped) from
  "back and changed" (embedded again);
- ``lookalike update`` (engine/delta.py) masks a changed product's older vectors with
  ``before = g``, the generation of the delta shards holding its new vector.

The service (serve/fresh.py) lists the folder every ``serve.poll_interval_s`` and masks the
shards it already has mmap'd; no Annoy file is reloaded. A daily run folds the deletes into its
plan (engine.plan.drop_deleted) and its new version starts with none.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Storage

FOLDER = "tombstones"
ALL = 2**31 - 1  # ``before`` of a delete: masked in every shard, deltas included
SCHEMA = pa.schema([("product_id", pa.string()), ("before", pa.int32()), ("content_key", pa.string())])
MAX_PER_CALL = 10_000   # ids one `lookalike delete` takes
MAX_TOTAL = 100_000     # deletes one version holds; past it, a daily run must fold them first
MAX_FILES = 1_000       # tombstone files one version holds: each replica rereads them all on a change


class TombstoneError(ValueError):
    """A delete that is refused (too many ids, nothing published)."""


def folder(model_version: str, index_version: str) -> tuple[str, ...]:
    return ("indexes", model_version, index_version, FOLDER)


def names(storage: Storage, model_version: str, index_version: str) -> list[str]:
    """The tombstone files of a version, oldest first (names sort by time)."""
    parts = folder(model_version, index_version)
    if not storage.is_local:  # gcsfs caches listings; a poll must see new objects
        storage.fs.invalidate_cache(storage.path(*parts))
    return [n for n in storage.listdir(*parts) if n.endswith(".parquet") and not n.startswith(".")]


def read(storage: Storage, model_version: str, index_version: str, only: list[str] | None = None) -> pa.Table:
    """The tombstones of a version (or of the files ``only``), one row per product: its largest ``before``."""
    parts = folder(model_version, index_version)
    tables = [pq.ParquetFile(storage.path(*parts, n), filesystem=storage.fs).read().cast(SCHEMA)
              for n in (names(storage, model_version, index_version) if only is None else only)]
    return consolidate(pa.concat_tables(tables) if tables else SCHEMA.empty_table())


def consolidate(table: pa.Table) -> pa.Table:
    """One row per product_id, the one with the largest ``before`` (the widest mask)."""
    if table.num_rows < 2:
        return table
    order = pc.sort_indices(table, sort_keys=[("product_id", "ascending"), ("before", "descending")])
    table = table.take(order)
    pid = table.column("product_id")
    first = np.ones(table.num_rows, bool)
    first[1:] = pc.not_equal(pid.slice(1), pid.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first))


def write(storage: Storage, model_version: str, index_version: str, table: pa.Table) -> str:
    """One new tombstone file (a fresh name, whole or absent); returns its name."""
    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{uuid.uuid4().hex[:8]}.parquet"
    parts = folder(model_version, index_version)
    table = table.select(SCHEMA.names).cast(SCHEMA)
    if storage.is_local:
        target = storage.path(*parts, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = storage.path(*parts, f".{name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    else:
        pq.write_table(table, storage.path(*parts, name), filesystem=storage.fs)
    return name


def deletes(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("before"), ALL))


def delete(storage: Storage, model_version: str, ids: list[str]) -> dict:
    """Tombstone ``ids`` in the published version (LATEST); ids it does not hold are reported.

    If LATEST moves while this writes (a run or update published), the ids are written to the new
    version too, so a delete is never lost to a swap (the publisher carries files it missed, see
    ``carry``; between the two every delete reaches the version served).
    """
    from engine import manifest
    from engine.pointer import latest

    ids = list(dict.fromkeys(str(i) for i in ids if str(i)))
    if not ids:
        raise TombstoneError("no product ids given")
    if len(ids) > MAX_PER_CALL:
        raise TombstoneError(f"{len(ids)} ids in one call; at most {MAX_PER_CALL} (split the list)")
    version = latest(storage, model_version)
    if version is None:
        raise TombstoneError(f"nothing published for model {model_version}; nothing to delete from")
    done: list[str] = []
    out: dict = {}
    while version not in done:
        state = manifest.read_state(storage, model_version, version, columns=["content_key"])
        wanted = pa.array(ids, pa.string())
        known = pc.is_in(state.column("product_id"), value_set=wanted)
        rows = state.filter(known).select(["product_id", "content_key"])
        rows = rows.take(pc.sort_indices(rows, [("product_id", "ascending")]))
        first = np.ones(rows.num_rows, bool)
        if rows.num_rows > 1:
            first[1:] = pc.not_equal(rows.column("product_id").slice(1),
                                     rows.column("product_id").slice(0, rows.num_rows - 1)).to_numpy(zero_copy_only=False)
        rows = rows.filter(pa.array(first))
        existing = deletes(read(storage, model_version, version))
        already = pc.is_in(rows.column("product_id"), value_set=existing.column("product_id"))
        new = rows.filter(pc.invert(already))
        if existing.num_rows + new.num_rows > MAX_TOTAL:
            raise TombstoneError(f"index {version} already holds {existing.num_rows} deletes; {new.num_rows} more "
                                 f"pass the cap of {MAX_TOTAL}: run `lookalike run` to fold them into the index first")
        if new.num_rows and len(names(storage, model_version, version)) >= MAX_FILES:
            raise TombstoneError(f"index {version} already holds {MAX_FILES} tombstone files (one per delete call): "
                                 "send ids in fewer, larger calls (--from FILE), or run `lookalike run` to fold them")
        if new.num_rows:
            write(storage, model_version, version, pa.table({
                "product_id": new.column("product_id"), "before": pa.array([ALL] * new.num_rows, pa.int32()),
                "content_key": new.column("content_key")}))
        known_ids = set(rows.column("product_id").to_pylist())
        unknown = [i for i in ids if i not in known_ids]
        if not out:
            out = {"index_version": version, "requested": len(ids), "deleted": new.num_rows,
                   "already_deleted": int(pc.sum(already).as_py() or 0), "unknown_count": len(unknown),
                   "unknown": unknown[:100], "tombstones": existing.num_rows + new.num_rows}
        else:
            out.setdefault("also_written_to", []).append(version)
        done.append(version)
        version = latest(storage, model_version)
    return out


def carry(storage: Storage, model_version: str, old: str | None, new: str, seen: list[str]) -> int:
    """After ``new`` is published over ``old``: deletes written to ``old`` after the publisher read
    its tombstones (files not in ``seen``) are written to ``new`` too. Returns the ids carried."""
    if not old:
        return 0
    late = [n for n in names(storage, model_version, old) if n not in set(seen)]
    if not late:
        return 0
    table = deletes(read(storage, model_version, old, only=late))
    if table.num_rows:
        write(storage, model_version, new, table)
    return table.num_rows
