"""Display columns (title, image_url, ...) and thumbnail entries beside each index version.

Every version holds, per category, ``<category>/display.arrow``: one row per indexed item, in the
order of the category's shards and their Annoy positions (shard-000's items, then shard-001's),
so the service finds a result's row from where its product is (engine.index.Directory) without
another key index. Columns: ``product_id``, the ``serve.display_columns`` the catalog has
(strings cut to ``MAX_CHARS``), and the item's thumbnail entry (``thumb_pack``, ``thumb_offset``,
``thumb_length``, ``thumb_etag``, ``thumb_key``: engine/thumbs.py).

Written at index build from the run's catalog, also for a category whose shards are reused by
reference from an older version: a retitled product shows its new title without a shard
rebuild. An uncompressed Arrow IPC file, so the service memory-maps it instead of holding the
strings of millions of products. ``lookalike compact`` has no catalog: its reused entries keep
the display file they had.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import thumbs
from engine.storage import Storage

FILE = "display.arrow"
MAX_CHARS = 300
THUMB_COLUMNS = ("thumb_pack", "thumb_offset", "thumb_length", "thumb_etag", "thumb_key")


def wanted(cfg) -> tuple | None:
    """The display columns a run keeps (None: no display file: no columns and no thumbnails)."""
    columns = tuple(c for c in cfg.serve.display_columns if c != "product_id")
    return columns if columns or cfg.download.thumbnail_size else None


def project(block: pa.Table, columns: tuple) -> pa.Table:
    """Ray task: a catalog block -> product_id and those of ``columns`` it has, as capped strings."""
    from engine.catalog import normalise

    block = normalise(block)
    out = {"product_id": block.column("product_id")}
    for name in columns:
        if name in block.column_names and name != "product_id":
            out[name] = _capped(block.column(name))
    return pa.table(out)


def _capped(col) -> pa.ChunkedArray:
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        try:
            col = pc.cast(col, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            col = pa.chunked_array([pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())])
    return pc.utf8_slice_codeunits(pc.cast(col, pa.string()), 0, MAX_CHARS)


@dataclasses.dataclass
class Sources:
    """What a version's display files are made of: the run's catalog projections (refs of
    ``project``), the new state's (product_id, content_key) (a ref), the previous version's
    display files (category -> storage parts) and the runs whose thumbnail packs are new."""

    catalog: list
    columns: tuple
    keys: object = None
    previous: dict = dataclasses.field(default_factory=dict)
    since: str | None = None
    until: str | None = None

    def complete(self, state: pa.Table, base: dict | None, model_version: str, version: str) -> "Sources":
        """Called by engine.index.build_version (which must not import this module)."""
        return complete(self, state, base, model_version, version)

    def write(self, root, prefix: tuple, categories: dict[str, dict]) -> None:
        write(root, prefix, categories, self)


def complete(sources: Sources, state: pa.Table, base: dict | None, model_version: str, version: str) -> Sources:
    """``sources`` with the new state's content keys and the previous version's display files."""
    import ray

    keys = state.select(["product_id", "content_key"])
    previous = {c: p for c, e in (base or {}).get("categories", {}).items() if (p := parts_of(model_version, c, e))}
    return dataclasses.replace(sources, keys=ray.put(keys), previous=previous,
                               since=base["index_version"] if base else None, until=version)


def rows(ids: pa.Array, catalog: pa.Table, columns: tuple) -> dict:
    """The display columns of ``ids`` (first catalog row of a product wins, as in the plan)."""
    where = pc.index_in(ids, value_set=catalog.column("product_id").combine_chunks())
    return {c: catalog.column(c).combine_chunks().take(where) for c in columns if c in catalog.column_names}


def write_category(root, prefix: tuple, category: str, ids_parts: list, sources: Sources) -> dict:
    """Ray task: one category's display file (its shards' ids in order); returns its manifest entry."""
    import ray

    storage = Storage.of(root)
    ids = pa.concat_arrays([pq.ParquetFile(storage.path(*p), filesystem=storage.fs).read(columns=["product_id"])
                            .column("product_id").combine_chunks().cast(pa.string()) for p in ids_parts]) \
        if ids_parts else pa.array([], pa.string())
    before = previous_table(storage, sources.previous[category]) if category in sources.previous else None
    tables = [t for t in ray.get(list(sources.catalog)) if t.num_rows]
    if before is not None and before.num_rows:  # after the run's catalog: rows an update's catalog lacks
        tables.append(before.select([c for c in before.column_names if c == "product_id" or c in sources.columns]))
    catalog = pa.concat_tables(tables, promote_options="default") if tables else pa.table({"product_id": pa.array([], pa.string())})
    out = {"product_id": ids, **rows(ids, catalog, sources.columns)}
    keys = ray.get(sources.keys) if sources.keys is not None else None
    if keys is not None and keys.num_rows:
        key = keys.column("content_key").combine_chunks().take(
            pc.index_in(ids, value_set=keys.column("product_id").combine_chunks()))
        candidates = [thumbs.new_entries(storage, prefix[1], sources.since, sources.until)]
        if before is not None:
            candidates.append(previous_entries(before))
        found = thumbs.match(ids, key, pa.concat_tables(candidates))
        out.update({"thumb_pack": found["pack"], "thumb_offset": found["offset"], "thumb_length": found["length"],
                    "thumb_etag": found["etag"], "thumb_key": found["content_key"]})
    table = pa.table(out)
    packs = sorted(p for p in pc.unique(table.column("thumb_pack")).to_pylist() if p) \
        if "thumb_pack" in table.column_names else []
    parts = (*prefix, category, FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.path(*parts) if storage.is_local else os.path.join(tmp, FILE)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with pa.OSFile(local + ".tmp", "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(local + ".tmp", local)
        with open(local, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        entry = {"file": FILE, "version": prefix[2], "bytes": os.path.getsize(local), "sha256": digest,
                 "columns": [c for c in sources.columns if c in table.column_names], "packs": packs,
                 "thumbs": int(table.num_rows - table.column("thumb_pack").null_count)
                 if "thumb_pack" in table.column_names else 0}
        if not storage.is_local:
            storage.put_file(local, *parts)
    return entry


def previous_table(storage: Storage, parts: tuple) -> pa.Table | None:
    """An earlier version's display file (None when it is gone)."""
    try:
        with storage.fs.open(storage.path(*parts), "rb") as f:
            return pa.ipc.open_file(pa.py_buffer(f.read())).read_all()
    except FileNotFoundError:
        return None


def previous_entries(table: pa.Table) -> pa.Table:
    """The thumbnail entries of an earlier version's display file (empty when it has none)."""
    if "thumb_pack" not in table.column_names:
        return thumbs.ENTRY_SCHEMA.empty_table()
    return pa.table({"product_id": table.column("product_id"), "content_key": table.column("thumb_key"),
                     "pack": table.column("thumb_pack"), "offset": table.column("thumb_offset"),
                     "length": table.column("thumb_length"), "etag": table.column("thumb_etag")},
                    schema=thumbs.ENTRY_SCHEMA).filter(pc.is_valid(table.column("thumb_pack")))


def parts_of(model_version: str, category: str, entry: dict) -> tuple | None:
    """Where a category's display file is (the version that wrote it), or None."""
    d = entry.get("display")
    return ("indexes", model_version, d["version"], category, d["file"]) if d else None


def write(root, prefix: tuple, categories: dict[str, dict], sources: Sources) -> None:
    """Write every category's display file into ``prefix`` (this version) as Ray tasks, setting
    ``display`` on the entries in ``categories`` (copies: a reused entry is an earlier manifest's too)."""
    import ray

    task = ray.remote(num_cpus=0.25)(write_category)
    jobs = []
    for category, entry in categories.items():
        owner = entry.get("version") or prefix[2]  # a delta shard names its own version (engine/delta.py)
        ids_parts = [("indexes", prefix[1], s.get("version") or owner, category, s["ids"])
                     for s in sorted(entry["shards"], key=lambda s: s["shard"])]
        jobs.append((category, task.remote(root, prefix, category, ids_parts, sources)))
    for category, ref in jobs:
        categories[category] = {**categories[category], "display": ray.get(ref)}


class Display:
    """A version's display files, memory-mapped: the columns and thumbnail of any indexed item."""

    def __init__(self, tables: dict[str, pa.Table], offsets: dict[str, dict[int, int]]):
        self.tables, self.offsets = tables, offsets

    @classmethod
    def load(cls, storage: Storage, manifest: dict, cache_dir: str, verify: bool = True) -> "Display":
        from engine.index import IndexLoadError, local_copy, sha256

        tables, offsets = {}, {}
        for category, entry in manifest["categories"].items():
            parts = parts_of(manifest["model_version"], category, entry)
            if parts is None:
                continue
            d = entry["display"]
            path = local_copy(storage, cache_dir, parts, d["sha256"] if verify else None)
            if verify and storage.is_local and sha256(path) != d["sha256"]:
                raise IndexLoadError(f"{category}/{d['file']}: checksum mismatch (corrupt or truncated file)")
            try:
                table = pa.ipc.open_file(pa.memory_map(path)).read_all()
            except Exception as exc:  # noqa: BLE001 - any unreadable file is a load failure
                raise IndexLoadError(f"{category}/{d['file']}: unreadable display file: {exc}") from None
            if table.num_rows != entry["count"]:
                raise IndexLoadError(f"{category}/{d['file']}: {table.num_rows} rows, manifest says {entry['count']}")
            shards = sorted(entry["shards"], key=lambda s: s["shard"])
            starts = np.cumsum([0] + [s["count"] for s in shards])
            tables[category] = table
            offsets[category] = {s["shard"]: int(a) for s, a in zip(shards, starts)}
        return cls(tables, offsets)

    def row(self, category: str, shard: int, position: int) -> dict | None:
        table = self.tables.get(category)
        if table is None:
            return None
        return {c: table.column(c)[self.offsets[category][shard] + position].as_py() for c in table.column_names}

    def columns_of(self, loc) -> dict:
        """Display columns (not product_id, not the thumbnail entry) of the item at ``loc``; {} when none."""
        row = self.row(loc.category, loc.shard, loc.position) or {}
        return {c: v for c, v in row.items() if c != "product_id" and c not in THUMB_COLUMNS and v is not None}

    def thumb(self, loc) -> tuple[str, int, int, str] | None:
        """(pack, offset, length, etag) of the item's thumbnail, or None."""
        row = self.row(loc.category, loc.shard, loc.position) or {}
        return (row["thumb_pack"], row["thumb_offset"], row["thumb_length"], row["thumb_etag"]) \
            if row.get("thumb_pack") else None

    def decorate(self, results: list[dict], directory) -> list[dict]:
        """Results with their display columns as flat keys beside product_id, category and score."""
        if not self.tables:
            return results
        out = []
        for r in results:
            loc = next((f for f in directory.lookup(r["product_id"]) if f.category == r["category"]), None)
            shown = self.columns_of(loc) if loc is not None else {}
            out.append({**r, **{c: v for c, v in shown.items() if c not in r}})
        return out
