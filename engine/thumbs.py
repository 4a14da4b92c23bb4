"""Thumbnails: small JPEGs of indexed products in a few large pack files, never one file each.

The download stage makes each thumbnail from the image it decodes anyway (engine/fetch.py);
the feature write stage, the run's commit point, appends a batch's thumbnails to one pack
``thumbs/<model_version>/run=<run_id>/<pack>.bin`` (per index line, so one line's collection
never judges another's runs) and writes its index ``<pack>.idx.parquet`` beside it
(product_id, content_key, offset, length, etag), the index last: a pack without one is a crash
leftover. Which thumbnail an index version shows is decided when it is built (engine/display.py):
this run's and pending runs' entries first, then the previous version's, matched on
(product_id, content_key), so a reused row keeps its old entry and a changed image never shows
its old picture. Packs no kept version names are deleted by engine/gc.py.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Storage

ROOT = "thumbs"
PACK, INDEX = ".bin", ".idx.parquet"
ENTRY_SCHEMA = pa.schema([("product_id", pa.string()), ("content_key", pa.string()), ("pack", pa.string()),
                          ("offset", pa.int64()), ("length", pa.int32()), ("etag", pa.string())])
ETAG_HEX = 20  # hex digits of sha256 kept as the ETag


def run_folder(run_id: str) -> str:
    return f"run={run_id}"


def write_pack(storage: Storage, line: str, run_id: str, ids: list, keys: list, thumbs: list) -> str | None:
    """Append ``thumbs`` (bytes, one per product; empty ones skipped) to a new pack; returns its
    name relative to ``thumbs/`` (None when there was nothing to write)."""
    rows = [(p, k, t) for p, k, t in zip(ids, keys, thumbs) if t]
    if not rows:
        return None
    name = f"{line}/{run_folder(run_id)}/{uuid.uuid4().hex}"
    offsets, at = [], 0
    for _, _, t in rows:
        offsets.append(at)
        at += len(t)
    entries = pa.table({"product_id": pa.array([r[0] for r in rows], pa.string()),
                        "content_key": pa.array([r[1] for r in rows], pa.string()),
                        "pack": pa.array([name] * len(rows), pa.string()),
                        "offset": pa.array(offsets, pa.int64()),
                        "length": pa.array([len(r[2]) for r in rows], pa.int32()),
                        "etag": pa.array([hashlib.sha256(r[2]).hexdigest()[:ETAG_HEX] for r in rows], pa.string())})
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "pack")
        with open(local, "wb") as f:
            for _, _, t in rows:
                f.write(t)
        _put(storage, local, name + PACK)
        pq.write_table(entries, os.path.join(tmp, "idx"))
        _put(storage, os.path.join(tmp, "idx"), name + INDEX)  # last: the pack is complete
    return name


def _put(storage: Storage, local: str, name: str) -> None:
    """Whole or nothing: a local file is renamed into place, an object appears when uploaded."""
    if storage.is_local:
        target = storage.path(ROOT, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        part = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        storage.fs.put_file(local, part)
        os.replace(part, target)
    else:
        storage.put_file(local, ROOT, name)


def runs(storage: Storage, line: str) -> list[str]:
    return [n.split("=", 1)[1] for n in storage.listdir(ROOT, line) if n.startswith("run=")]


def new_entries(storage: Storage, line: str, since: str | None, until: str | None = None) -> pa.Table:
    """Entries of the packs written by runs after ``since`` (the previous version; None: all)
    up to ``until`` (this run), newest run first: what a version built now may take from."""
    tables = []
    for run in sorted(runs(storage, line), reverse=True):
        if (since is not None and run <= since) or (until is not None and run > until):
            continue
        for n in storage.listdir(ROOT, line, run_folder(run)):
            if n.endswith(INDEX):
                path = storage.path(ROOT, line, run_folder(run), n)
                tables.append(pq.ParquetFile(path, filesystem=storage.fs).read())
    return pa.concat_tables([t.cast(ENTRY_SCHEMA) for t in tables]) if tables else ENTRY_SCHEMA.empty_table()


def match(ids: pa.Array, keys: pa.Array, candidates: pa.Table) -> pa.Table:
    """For each (product_id, content_key), the first candidate entry with both equal (nulls when
    none): pack, offset, length, etag, content_key."""
    def joined(p, k):
        return pc.binary_join_element_wise(pc.cast(p, pa.string()), pc.fill_null(pc.cast(k, pa.string()), ""), "\x1f")

    where = pc.index_in(joined(ids, keys), value_set=joined(candidates.column("product_id"),
                                                            candidates.column("content_key")).combine_chunks())
    return pa.table({c: candidates.column(c).combine_chunks().take(where)
                     for c in ("pack", "offset", "length", "etag", "content_key")})


def read(storage: Storage, pack: str, offset: int, length: int) -> bytes:
    """One thumbnail's bytes: a range read of its pack (local file or object)."""
    path = storage.path(ROOT, pack + PACK)
    if storage.is_local:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return storage.fs.cat_file(path, start=offset, end=offset + length)


def sweep(storage: Storage, line: str, referenced: set[str], current: str) -> int:
    """Delete packs of runs up to ``current`` (LATEST) that no kept version names, and the
    entry files of those runs (a published version holds its entries in its display files);
    a newer run may still be writing its own. Returns the files deleted."""
    gone = 0
    for run in runs(storage, line):
        if run > current:
            continue
        folder = run_folder(run)
        for n in storage.listdir(ROOT, line, folder):
            pack = f"{line}/{folder}/{n.removesuffix(PACK)}"
            if n.endswith(INDEX) or n.endswith(".tmp") or (n.endswith(PACK) and pack not in referenced):
                storage.rm(ROOT, line, folder, n)
                gone += 1
        if storage.is_local and not storage.listdir(ROOT, line, folder):
            storage.rm(ROOT, line, folder)
    return gone
