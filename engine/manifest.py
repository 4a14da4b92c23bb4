"""The product manifest: which objects an index version holds and where each one's vector is.

One row per (product, object) in STATE_SCHEMA; ``file`` (a feature parquet path relative to the
storage root) and ``row`` (its position in that file) say where the vector is, so the index build
reads exactly the rows it needs and nothing ever lists a folder to find them.

A version's manifest is a delta on an earlier one, so a run writes manifest data in proportion to
what changed, not a full copy::

    manifests/<line>/<version>/added.parquet    STATE rows new in this version (a base: all rows)
    manifests/<line>/<version>/removed.parquet  (product_id, category) of earlier rows that leave
    manifests/<line>/<version>/meta.json        written last: chain, counts, feature files used

``meta.chain`` lists the versions to apply, oldest (a full base) first, ending with this one.
When the deltas since the base pass ``CONSOLIDATE_FRACTION`` of its rows, the new version is
written as a fresh base instead (so reading a state costs at most ~1.5 bases). ``meta.files``
is the feature-file catalog of the state (file -> rows, live rows, bytes): compaction picks files
from it and garbage collection keeps exactly the files some kept version names there.

A run builds its new state with ``next_state`` (one lean copy, LEAN_SCHEMA), never the old
state beside the new one.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.features import run_categories, run_files
from engine.storage import Storage

STATE_SCHEMA = pa.schema([
    ("product_id", pa.string()), ("content_key", pa.string()), ("category", pa.string()),
    ("catalog_category", pa.string()), ("model_version", pa.string()), ("detect_version", pa.string()),
    ("objects", pa.int32()), ("image_url", pa.string()), ("file", pa.string()), ("row", pa.int64())])
KEY = ["product_id", "category"]
# A run's state in memory: the columns that repeat (a handful of values over millions of rows)
# are dictionary-encoded, so the state costs ~110 bytes a row instead of ~240 (engine.pipeline).
DICT_COLUMNS = ("model_version", "detect_version", "file")
LEAN_SCHEMA = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if f.name in DICT_COLUMNS else f
                         for f in STATE_SCHEMA])
READ_ROWS = 65536  # state rows read at a time
REMOVED_SCHEMA = pa.schema([("product_id", pa.string()), ("category", pa.string())])
META = "meta.json"
CONSOLIDATE_FRACTION = 0.5


def empty_state() -> pa.Table:
    return STATE_SCHEMA.empty_table()


def folder(line: str, version: str) -> tuple[str, ...]:
    return ("manifests", line, version)


def exists(storage: Storage, line: str, version: str) -> bool:
    return storage.exists(*folder(line, version), META)


def read_meta(storage: Storage, line: str, version: str) -> dict | None:
    try:
        return storage.read_json(*folder(line, version), META)
    except FileNotFoundError:
        return None


def versions(storage: Storage, line: str) -> list[str]:
    """Committed manifest versions of a line, oldest first."""
    return [v for v in storage.listdir("manifests", line) if exists(storage, line, v)]


def _bucket(product_ids: pa.Array, n: int) -> pa.Array:
    try:
        from engine.partition import bucket
    except ImportError:  # stand-in until engine/partition.py lands (same contract: stable, int32)
        values = product_ids.to_pylist()
        return pa.array([zlib.crc32((v or "").encode()) % n for v in values], pa.int32())
    return bucket(product_ids, n)


def _read(storage: Storage, line: str, version: str, name: str, columns, bucket) -> pa.Table:
    path = storage.path(*folder(line, version), name)
    table = pq.ParquetFile(path, filesystem=storage.fs).read(columns=columns)
    if bucket is not None:
        i, n = bucket
        table = table.filter(pc.equal(_bucket(table.column("product_id"), n), i))
    return table


def lean(t: pa.Table) -> pa.Table:
    return t.select(STATE_SCHEMA.names).cast(LEAN_SCHEMA)


class _Leaving:
    """(product_id, category) keys that leave, prepared once to be dropped from many batches.

    A product_id pre-filter (no copy) narrows the exact two-column match to the few candidate
    rows, so a delta of thousands against millions of rows costs a mask, not a join of the whole.
    """

    def __init__(self, keys: list[pa.Table]):
        keys = [k.select(KEY).cast(REMOVED_SCHEMA) for k in keys if k.num_rows]
        self.keys = pa.concat_tables(keys).group_by(KEY).aggregate([]) if keys else REMOVED_SCHEMA.empty_table()
        self.ids = pc.unique(self.keys.column("product_id").combine_chunks()) if keys else None

    def drop(self, t: pa.Table) -> pa.Table:
        if self.ids is None or not t.num_rows:
            return t
        candidate = pc.is_in(t.column("product_id"), value_set=self.ids)
        at = np.flatnonzero(candidate.to_numpy(zero_copy_only=False))
        if not len(at):
            return t
        rows = t.select(["product_id"]).take(pa.array(at)).append_column(
            "category", t.column("category").take(pa.array(at)).cast(pa.string())).append_column(
            "at", pa.array(at, pa.int64()))
        found = rows.join(self.keys, KEY, join_type="left semi", use_threads=False).column("at").to_numpy()
        keep = np.ones(t.num_rows, bool)
        keep[found] = False
        return t.filter(pa.array(keep))


def next_state(storage: Storage, line: str, base_version: str | None, added: pa.Table,
               removed: pa.Table) -> pa.Table:
    """``base_version``'s state minus ``removed`` (and minus any row ``added`` replaces) plus
    ``added``, in LEAN_SCHEMA: the one copy of the state a run holds.

    The chain is read a batch at a time, each batch losing at once the rows a later delta (or
    this run) replaces, so memory is the result plus one batch, never the old state beside the new.
    """
    meta = read_meta(storage, line, base_version) if base_version else None
    parts: list[list[pa.Table]] = []
    later = [removed, added]
    for version in reversed(meta["chain"] if meta else []):
        leaving, mine = _Leaving(later), []
        pf = pq.ParquetFile(storage.path(*folder(line, version), "added.parquet"), filesystem=storage.fs,
                            read_dictionary=list(DICT_COLUMNS))
        for batch in pf.iter_batches(batch_size=READ_ROWS, columns=STATE_SCHEMA.names):
            t = leaving.drop(pa.Table.from_batches([batch]))
            if t.num_rows:
                mine.append(lean(t))
        parts.append(mine)
        if version != meta["chain"][0]:
            later = later + [_read(storage, line, version, "removed.parquet", None, None),
                             _read(storage, line, version, "added.parquet", KEY, None)]
    tables = [t for mine in reversed(parts) for t in mine] + [lean(added)]
    return pa.concat_tables(tables).unify_dictionaries()  # one dictionary per column: group_by needs it


def _drop(state: pa.Table, keys: pa.Table) -> pa.Table:
    """``state`` without the rows whose (product_id, category) is in ``keys`` (one filtered copy)."""
    return _Leaving([keys]).drop(state)


def apply(state: pa.Table, added: pa.Table, removed: pa.Table) -> pa.Table:
    """``state`` minus ``removed`` (and minus any row ``added`` replaces) plus ``added``."""
    gone = pa.concat_tables([removed.select(KEY).cast(REMOVED_SCHEMA), added.select(KEY).cast(REMOVED_SCHEMA)])
    kept = _drop(state, gone)
    if kept.schema != added.schema:
        kept = kept.select(added.column_names).cast(added.schema)
    return pa.concat_tables([kept, added])


def read_state(storage: Storage, model_version: str, index_version: str, bucket: tuple[int, int] | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """A version's full state (base + deltas applied), columnar; ``bucket=(i, n)``: only rows whose
    ``partition.bucket(product_id, n) == i``; ``columns``: a subset (product_id and category always)."""
    meta = read_meta(storage, model_version, index_version)
    if meta is None:
        raise FileNotFoundError(f"{storage.uri(*folder(model_version, index_version))}: no manifest")
    cols = None if columns is None else list(dict.fromkeys(KEY + list(columns)))
    state = None
    for version in meta["chain"]:
        added = _read(storage, model_version, version, "added.parquet", cols, bucket)
        if state is None:
            state = added
            continue
        removed = _read(storage, model_version, version, "removed.parquet", None, bucket)
        state = apply(state, added, removed)
    return state if columns is not None else state.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)


def diff(base: pa.Table, state: pa.Table, touched: pa.Array | None = None) -> tuple[pa.Table, pa.Table]:
    """(added, removed) that turn ``base`` into ``state``: rows whose vector location or content
    differs are removed and added again; nothing else is written.

    ``touched``: product_ids that can differ (a run's added, removed and moved rows); every other
    row is the same in both by construction, so only these are joined (millions of rows unread).
    """
    if touched is not None:
        value_set = pc.unique(touched)
        base = base.filter(pc.is_in(base.column("product_id"), value_set=value_set))
        state = state.filter(pc.is_in(state.column("product_id"), value_set=value_set))
    same = ["product_id", "category", "file", "row", "content_key"]
    added = state.join(base.select(same), same, join_type="left anti", use_threads=False) if base.num_rows else state
    kept = base.join(state.select(same), same, join_type="left anti", use_threads=False) if state.num_rows else base
    added = added.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)
    return added, kept.select(KEY).cast(REMOVED_SCHEMA)


def pending_state(storage: Storage, model_versions: list[str], since_version: str | None,
                  current_run: str) -> pa.Table:
    """Committed feature parts of runs newer than ``since_version`` that never published (a crashed
    or refused run, for crash-resume); same schema, ``file``/``row`` pointing into those parts."""
    tables = [run_state(storage, mv, run_id) for run_id, mv in pending_runs(storage, model_versions, since_version,
                                                                             current_run)]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else empty_state()


def pending_runs(storage: Storage, model_versions: list[str], since_version: str | None,
                 current_run: str) -> list[tuple[str, str]]:
    """(run_id, model_version) of the runs ``pending_state`` reads, oldest first.

    Lists only the folders of such runs: garbage collection removes the folders of older ones.
    """
    out = []
    for mv in dict.fromkeys(model_versions):
        for name in storage.listdir("features", mv):
            run_id = name.split("=", 1)[1] if name.startswith("run=") else None
            if run_id and not (since_version and run_id <= since_version) and run_id != current_run:
                out.append((run_id, mv))
    return sorted(out)


def run_state(storage: Storage, model_version: str, run_id: str) -> pa.Table:
    """STATE rows of one run's committed feature parts."""
    tables = [_part_state(storage, path, model_version) for category in run_categories(storage, model_version, run_id)
              for path in run_files(storage, model_version, run_id, category)]
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables) if tables else empty_state()


def _part_state(storage: Storage, relative: str, model_version: str) -> pa.Table | None:
    pf = pq.ParquetFile(storage.path(relative), filesystem=storage.fs)
    names = pf.schema_arrow.names
    if "content_key" not in names:
        return None
    t = pf.read(columns=[c for c in STATE_SCHEMA.names if c in names and c not in ("file", "row")])
    n = t.num_rows
    fill = {"catalog_category": lambda: t.column("category"), "model_version": lambda: pa.array([model_version] * n),
            "detect_version": lambda: pa.array(["whole"] * n), "objects": lambda: pa.array([1] * n, pa.int32()),
            "image_url": lambda: pa.nulls(n, pa.string())}
    for name, make in fill.items():
        if name not in t.column_names:
            t = t.append_column(name, make())
    t = t.append_column("file", pa.array([relative] * n, pa.string()))
    t = t.append_column("row", pa.array(np.arange(n, dtype=np.int64)))
    return t.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)


def file_catalog(storage: Storage, state: pa.Table, known: dict) -> dict:
    """file -> {rows, live, bytes} for every file ``state`` uses; ``known``: an earlier catalog
    (rows and bytes of a file never change), others are read from their parquet footers."""
    files = state.group_by("file").aggregate([("row", "count")])
    out = {}
    for name, live in zip(files.column("file").to_pylist(), files.column("row_count").to_pylist()):
        entry = known.get(name)
        if entry is None:
            info = storage.fs.info(storage.path(name))
            rows = pq.ParquetFile(storage.path(name), filesystem=storage.fs).metadata.num_rows
            entry = {"rows": rows, "bytes": int(info["size"])}
        out[name] = {"rows": entry["rows"], "bytes": entry["bytes"], "live": int(live)}
    return out


def write(storage: Storage, model_version: str, index_version: str, base_version: str | None,
          added: pa.Table, removed: pa.Table, state: pa.Table | None = None) -> dict:
    """Commit ``index_version``'s manifest as a delta on ``base_version`` (None: a fresh base).

    ``added``: STATE rows new in this version; ``removed``: (product_id, category) of base rows
    that leave. ``state``: the resulting full state when the caller has it (saves reading the base).
    meta.json is written last: a manifest without it does not exist.
    """
    added = added.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)
    removed = removed.select(KEY).cast(REMOVED_SCHEMA)
    base = read_meta(storage, model_version, base_version) if base_version else None
    if state is None:
        state = read_state(storage, model_version, base_version) if base else empty_state()
        state = apply(state, added, removed)
    delta_rows = (base["delta_rows"] if base else 0) + added.num_rows + removed.num_rows
    fresh = base is None or delta_rows > CONSOLIDATE_FRACTION * max(base["base_rows"], 1)
    parts = folder(model_version, index_version)
    storage.makedirs(*parts)
    if fresh:
        added = state
        removed, chain, delta_rows = REMOVED_SCHEMA.empty_table(), [index_version], 0
    else:
        chain = base["chain"] + [index_version]
    _write_table(storage, added, *parts, "added.parquet")
    _write_table(storage, removed, *parts, "removed.parquet")
    counts = state.group_by("category").aggregate([("product_id", "count")])
    meta = {"version": index_version, "base": base_version, "chain": chain, "rows": state.num_rows,
            "base_rows": state.num_rows if fresh else base["base_rows"], "delta_rows": delta_rows,
            "added": added.num_rows if not fresh else 0, "removed": removed.num_rows,
            "categories": dict(sorted(zip(counts.column("category").to_pylist(),
                                          counts.column("product_id_count").to_pylist()))),
            "files": file_catalog(storage, state, base["files"] if base else {})}
    storage.write_json(meta, *parts, META)
    return meta


def _write_table(storage: Storage, table: pa.Table, *parts: str) -> None:
    """``table`` in its file schema, cast a slice at a time (a lean state is never expanded whole)."""
    target = storage.path(*parts)
    schema = STATE_SCHEMA if "file" in table.column_names else REMOVED_SCHEMA
    path = target if not storage.is_local else f"{target}.tmp"
    with pq.ParquetWriter(path, schema, filesystem=storage.fs) as out:
        for at in range(0, table.num_rows, READ_ROWS):
            out.write_table(table.slice(at, READ_ROWS).select(schema.names).cast(schema))
    if storage.is_local:
        storage.fs.mv(path, target)


def categories(storage: Storage, model_version: str, version: str) -> list[str]:
    return sorted(read_meta(storage, model_version, version)["categories"])


def read_category(storage: Storage, model_version: str, version: str, category: str,
                  columns=("product_id", "vector")) -> pa.Table:
    """A category's stored columns (vectors included) for a version, read by file and row."""
    state = read_state(storage, model_version, version, columns=["file", "row"])
    state = state.filter(pc.equal(state.column("category"), category)).sort_by([("file", "ascending"),
                                                                               ("row", "ascending")])
    parts = []
    for file in pc.unique(state.column("file")).to_pylist():
        rows = state.filter(pc.equal(state.column("file"), file)).column("row")
        parts.append(pq.ParquetFile(storage.path(file), filesystem=storage.fs).read(columns=list(columns)).take(rows))
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({c: [] for c in columns})
