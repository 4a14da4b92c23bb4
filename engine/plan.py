"""Plan a run against what is already known, so a daily run costs in proportion to the change.

Every catalog row gets a content key: ``sha1(image_url, updated_at)``. It is decided from the
catalog alone (no extra request per image); a picture replaced behind the same URL without a
new ``updated_at`` is not seen, which ``--full`` (``plan.full``) covers.

A row is ``new`` (product never indexed), ``changed`` (its key, category, detection settings or
the embedding model of one of its objects differ), ``reuse`` or ``duplicate`` (its product_id
came earlier in the catalog: the first row wins). Stored features are those named by the
product manifest of the published index version, plus committed shards of later runs that never
published (a crashed or refused run): that is what makes a re-run resume instead of recompute.

The plan is a columnar join, never a Python object per row, and no process holds the whole
catalog or state: catalog blocks are split by ``partition.bucket(product_id, n)`` (one Ray task
a block), then one Ray task a bucket joins its catalog rows with its slice of the state. Only
``new`` and ``changed`` rows come out as work for the download, detect and embed stages; reused
rows stay where they are (their state rows, ``kept``), counted. Rows are ordered by
``row = block << 32 | offset`` in catalog order, which is what "first" means for duplicates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import resource
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import attributes as attributes_module
from engine import display as display_module
from engine import manifest, partition, pointer
from engine.catalog import REJECT_SCHEMA
from engine.manifest import STATE_SCHEMA, empty_state
from engine.storage import Storage

NEW, CHANGED, REUSE, DUPLICATE = "new", "changed", "reuse", "duplicate"
# catalog_row: the row's place in the catalog (block << 32 | offset); file and row are filled by
# the feature store for the vectors it writes.
PLAN_FIELDS = [pa.field("content_key", pa.string()), pa.field("action", pa.string()),
               pa.field("catalog_category", pa.string()), pa.field("catalog_row", pa.int64()),
               pa.field("object", pa.int32()), pa.field("objects", pa.int32()), pa.field("note", pa.string())]
# A worker maps every object-store page its tasks ever touched: retired after this many plan
# tasks, no worker's resident memory grows with the catalog.
TASKS_PER_WORKER = 8
KEY_ROWS = 65536  # rows whose content keys are made at a time (one Python string each)
STATE_ROWS = 65536  # state rows a split task reads at a time
KEPT_SCHEMA = STATE_SCHEMA.append(pa.field("source", pa.int32()))
# A piece of the previous state as the bucket tasks get it: STATE rows + source (0: published,
# 1...: pending runs), chain (the position in the published manifest's chain of the delta the row
# comes from) and gone (a removed.parquet row: only product_id and category are set).
PIECE_SCHEMA = KEPT_SCHEMA.append(pa.field("chain", pa.int32())).append(pa.field("gone", pa.bool_()))
REMOVED_SCHEMA = manifest.REMOVED_SCHEMA


def content_key(image_url, updated_at) -> str:
    raw = f"{image_url or ''}\x00{'' if updated_at is None else updated_at}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def content_keys(batch: pa.Table) -> pa.Array:
    """``content_key`` of each row of one block (hashlib has no vectorised form; one block at a time)."""
    urls = batch.column("image_url").to_pylist()
    stamps = batch.column("updated_at").cast(pa.string()).to_pylist() if "updated_at" in batch.column_names \
        else [None] * len(urls)
    return pa.array([content_key(u, s) for u, s in zip(urls, stamps)], pa.string())


def _fresh() -> None:
    """Hand memory freed by earlier tasks of this worker back to the OS: a long-lived worker's
    allocator otherwise keeps every task's high-water mark, and its RSS grows with the run."""
    pa.default_memory_pool().release_unused()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the previous state ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StateSources:
    """Where the previous state lives: the published manifest (source 0: its chain of base and
    deltas, engine.manifest) and, after it, committed features of runs that never published
    (sources 1..., oldest first; later sources win).

    No task reads the whole state: each part (a row group of one chain file, or one pending run)
    is split by bucket once, and a bucket task applies the chain to its own rows (``_chain``).
    """

    storage: Storage
    line: str
    published: str | None
    pending: tuple[tuple[str, str], ...]  # (run_id, model_version)
    rows: int
    chain: tuple[str, ...] = ()

    @classmethod
    def find(cls, storage: Storage, line: str, model_versions: list[str], current_run: str) -> "StateSources":
        published = pointer.latest(storage, line)
        meta = manifest.read_meta(storage, line, published) if published else None
        if meta is None:
            published = None
        pending = tuple(manifest.pending_runs(storage, model_versions, published, current_run))
        return cls(storage, line, published, pending, meta["rows"] if meta else 0,
                   tuple(meta["chain"]) if meta else ())

    def _file(self, version: str, name: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.storage.path(*manifest.folder(self.line, version), name),
                              filesystem=self.storage.fs)

    def parts(self) -> list[tuple]:
        """Pieces of the state that one task each reads: the row groups of each chain version's
        added and removed rows, then each pending run."""
        out = []
        for at, version in enumerate(self.chain):
            for name in ("added.parquet", "removed.parquet") if at else ("added.parquet",):
                out += [("published", at, version, name, g) for g in range(self._file(version, name).num_row_groups)]
        return out + [("pending", source, run_id, mv) for source, (run_id, mv) in enumerate(self.pending, 1)]

    def read_part(self, part: tuple):
        """PIECE_SCHEMA tables of one part, in bounded batches."""
        if part[0] == "published":
            _, at, version, name, group = part
            for batch in self._file(version, name).iter_batches(batch_size=STATE_ROWS, row_groups=[group]):
                t = pa.Table.from_batches([batch])
                yield _piece(t, 0, at) if name == "added.parquet" else _gone(t, at)
        else:
            _, source, run_id, mv = part
            yield _piece(manifest.run_state(self.storage, mv, run_id), source, -1)


def _state(t: pa.Table, source: int) -> pa.Table:
    """KEPT_SCHEMA rows: STATE rows tagged with their source."""
    t = t.select(STATE_SCHEMA.names).cast(STATE_SCHEMA)
    return t.append_column("source", pa.array(np.full(t.num_rows, source, np.int32)))


def _piece(t: pa.Table, source: int, chain: int) -> pa.Table:
    t = _state(t, source)
    t = t.append_column("chain", pa.array(np.full(t.num_rows, chain, np.int32)))
    return t.append_column("gone", pa.array(np.zeros(t.num_rows, bool)))


def _gone(t: pa.Table, chain: int) -> pa.Table:
    """removed.parquet rows as pieces: (product_id, category) set, gone."""
    n = t.num_rows
    cols = {f.name: pa.nulls(n, f.type) for f in PIECE_SCHEMA}
    cols.update(product_id=t.column("product_id"), category=t.column("category"),
                source=pa.array(np.zeros(n, np.int32)), chain=pa.array(np.full(n, chain, np.int32)),
                gone=pa.array(np.ones(n, bool)))
    return pa.table(cols, schema=PIECE_SCHEMA)


def _chain(pieces: pa.Table) -> pa.Table:
    """KEPT_SCHEMA rows of one bucket: the published chain applied (``manifest.apply``, oldest
    delta first), then the pending runs' rows."""
    if "chain" not in pieces.column_names:
        return pieces
    chain = pieces.column("chain").to_numpy()
    gone = pieces.column("gone").to_numpy(zero_copy_only=False)
    state = None
    for at in (range(int(chain.max()) + 1) if len(chain) else ()):
        added = pieces.filter(pa.array((chain == at) & ~gone)).drop_columns(["chain", "gone"])
        if state is None:
            state = added
            continue
        removed = pieces.filter(pa.array((chain == at) & gone)).select(manifest.KEY)
        state = manifest.apply(state, added, removed)
    pending = pieces.filter(pa.array(chain < 0)).drop_columns(["chain", "gone"])
    return pa.concat_tables([state, pending]) if state is not None else pending


# --- the plan -------------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """What a bucket task needs to judge reuse."""

    detect_version: str
    full: bool
    default_version: str
    versions: dict  # category -> model version, for categories with their own model


@dataclasses.dataclass
class Plan:
    """A planned run: counts and categories on the driver, every per-row table in the object store."""

    buckets: int
    counts: dict        # rows_in, new, changed, unchanged_reused, duplicates, gone, work, kept_objects, state_rows,
                        # resumed (kept objects from pending runs)
    categories: dict    # category -> reused objects
    work: list          # refs: Arrow tables of new/changed rows (catalog columns + PLAN_FIELDS), non-empty only
    rejects: list       # refs: REJECT_SCHEMA tables (lines the read refused, then duplicates)
    kept: list          # refs: KEPT_SCHEMA (manifest rows of reused objects; source 0 = published)
    removed: list       # refs: REMOVED_SCHEMA, published rows that leave (changed or gone)
    base_changed: list  # refs: product_id of published products that are work (removed if rejected again)
    resumed: list       # refs: the ``kept`` tables that hold rows of pending runs (source > 0)
    peak_rss_mb: dict   # task kind -> largest peak RSS a task of it reported
    seconds: dict       # read (catalog blocks), split (catalog and state by bucket), join (bucket tasks)
    attributes: list = dataclasses.field(default_factory=list)  # refs: product_id + index.filter_columns per catalog block
    display: list | None = None  # refs: product_id + serve.display_columns per catalog block (engine.display)


def buckets_for(rows: int, bucket_rows: int) -> int:
    """A power of two, so that a store partitioned by ``bucket(id, 2**k)`` serves any smaller count:
    ``bucket(id, n) == bucket(id, 2**k) % n``."""
    return 1 << max(0, math.ceil(math.log2(max(1.0, rows / bucket_rows))))


def make(blocks: list, sources: StateSources, settings: Settings, bucket_rows: int, filter_columns: dict | None = None,
         display_columns: tuple | None = None, gone: pa.Table | None = None, refused: list = ()) -> Plan:
    """Plan the catalog ``blocks`` (refs of Arrow tables in catalog order: engine.catalog.blocks)
    against ``sources``; runs Ray tasks, returns when planned. ``filter_columns``: also keep those
    columns of every catalog block (engine.attributes); ``display_columns``: those of them the
    catalog has (engine.display; None: no display file); ``gone``: deletes folded in
    (engine.tombstones.drop_deleted); ``refused``: refs of REJECT_SCHEMA tables of the rows the
    read refused (engine.catalog.blocks), counted in rows_in and malformed."""
    import ray

    started = time.monotonic()
    blocks = list(blocks)
    count = ray.remote(num_cpus=0.25)(_rows)
    counted = ray.get([count.remote(t) for t in blocks + list(refused)])
    rows, refused_rows = sum(counted[:len(blocks)]), counted[len(blocks):]
    read_s = time.monotonic() - started
    n = buckets_for(max(rows, sources.rows), bucket_rows)
    split = ray.remote(max_calls=TASKS_PER_WORKER)(_split).options(num_returns=n + 1, num_cpus=1)
    pieces: list[list] = [[] for _ in range(n)]
    rss, attributes = [], []
    project = ray.remote(attributes_module.project).options(num_cpus=0.25) if filter_columns else None
    shown = ray.remote(display_module.project).options(num_cpus=0.25) if display_columns is not None else None
    display = [] if shown is not None else None
    gone = ray.put(gone) if gone is not None and gone.num_rows else None
    for seq, ref in enumerate(blocks):
        if project is not None:
            attributes.append(project.remote(ref, filter_columns))
        if shown is not None:
            display.append(shown.remote(ref, tuple(display_columns)))
        out = split.remote(ref, seq, n, gone)
        rss.append(out[0])
        for i in range(n):
            pieces[i].append(out[i + 1])
    del blocks
    split_state = ray.remote(max_calls=TASKS_PER_WORKER)(_split_state).options(num_returns=n + 1, num_cpus=1)
    state: list[list] = [[] for _ in range(n)]
    for part in sources.parts():
        out = split_state.remote(sources, part, n)
        rss.append(out[0])
        for i in range(n):
            state[i].append(out[i + 1])
    split_rss = max(ray.get(rss), default=0.0)
    split_s = time.monotonic() - started - read_s
    task = ray.remote(max_calls=TASKS_PER_WORKER // 4)(_plan_bucket).options(num_returns=6, num_cpus=1)
    outs = [task.remote(settings, len(pieces[i]), *pieces[i], *state[i]) for i in range(n)]
    del state
    del pieces
    summaries = ray.get([o[0] for o in outs])
    counts: dict = {}
    categories: dict = {}
    for s in summaries:
        for k, v in s["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in s["categories"].items():
            categories[k] = categories.get(k, 0) + v
    counts["malformed"] = sum(refused_rows)
    counts["rows_in"] = counts.get("rows_in", 0) + counts["malformed"]
    return Plan(n, counts, dict(sorted(categories.items())),
                work=[o[1] for o, s in zip(outs, summaries) if s["counts"]["work"]],
                rejects=[r for r, k in zip(refused, refused_rows) if k] +
                        [o[2] for o, s in zip(outs, summaries) if s["counts"]["duplicates"]],
                kept=[o[3] for o in outs], removed=[o[4] for o in outs], base_changed=[o[5] for o in outs],
                resumed=[o[3] for o, s in zip(outs, summaries) if s["counts"]["resumed"]],
                peak_rss_mb={"split": split_rss, "bucket": max(s["peak_rss_mb"] for s in summaries)},
                seconds={"read": round(read_s, 3), "split": round(split_s, 3),
                         "join": round(time.monotonic() - started - read_s - split_s, 3)},
                attributes=attributes, display=display)


def _rows(block: pa.Table) -> int:
    return block.num_rows


def _split(block: pa.Table, seq: int, n: int, gone: pa.Table | None = None) -> tuple:
    """Ray task: one catalog block -> its rows by bucket, with content_key and row order
    (``gone``: deleted products dropped first, engine.tombstones)."""
    from engine.catalog import normalise

    _fresh()
    block = normalise(block)
    if gone is not None:
        block = drop_deleted(block, gone)
    keys = [content_keys(block.slice(at, KEY_ROWS)) for at in range(0, block.num_rows, KEY_ROWS)]
    block = block.append_column("content_key", pa.chunked_array(keys, pa.string()))
    block = block.append_column("row", pa.array((seq << 32) + np.arange(block.num_rows, dtype=np.int64)))
    return (peak_rss_mb(), *_by_bucket(block, n))


def drop_deleted(batch: pa.Table, gone: pa.Table) -> pa.Table:
    """A catalog block without the deleted products that it still lists as they were (same
    content_key); a deleted product the catalog brings back changed stays in, to be embedded."""
    pid = batch.column("product_id").cast(pa.string())
    hit = pc.fill_null(pc.is_in(pid, value_set=gone.column("product_id")), False)
    if not pc.any(hit).as_py():
        return batch
    at = pc.index_in(pid, value_set=gone.column("product_id")).to_numpy(zero_copy_only=False)
    hit_np = hit.to_numpy(zero_copy_only=False)
    sub = batch.filter(hit)
    same = pc.fill_null(pc.equal(content_keys(sub), pc.take(gone.column("content_key"), pa.array(at[hit_np].astype(np.int64)))), False)
    drop = np.zeros(batch.num_rows, bool)
    drop[np.flatnonzero(hit_np)] = same.to_numpy(zero_copy_only=False)
    return batch.filter(pa.array(~drop))


def _split_state(sources: StateSources, part: tuple, n: int) -> tuple:
    """Ray task: one part of the state -> its rows by bucket."""
    _fresh()
    out: list[list] = [[] for _ in range(n)]
    for t in sources.read_part(part):
        for i, piece in enumerate(_by_bucket(t, n)):
            if piece.num_rows:
                out[i].append(piece)
    empty = _piece(empty_state(), 0, 0)
    return (peak_rss_mb(), *(pa.concat_tables(p) if p else empty for p in out))


def _by_bucket(table: pa.Table, n: int) -> list[pa.Table]:
    """``table``'s rows by ``partition.bucket(product_id, n)``, each in its original order."""
    b = partition.bucket(table.column("product_id"), n).to_numpy()
    table = table.take(pa.array(np.argsort(b, kind="stable")))
    ends = np.cumsum(np.bincount(b, minlength=n))
    return [table.slice(int(e - c), int(c)) for e, c in zip(ends, np.bincount(b, minlength=n))]


def _plan_bucket(settings: Settings, n_catalog: int, *pieces: pa.Table) -> tuple:
    """Ray task: one bucket's catalog rows (the first ``n_catalog`` pieces) joined with its state
    (the other pieces, in source order).

    Joins are positions, not Acero hash joins: ``index_in`` of the state's product_ids in the
    catalog's gives each state row its catalog row, and per-product facts are numpy reductions
    over those positions. Returns (summary, work, rejects, kept, removed, base_changed); see ``Plan``.
    """
    _fresh()
    cats = [p for p in pieces[:n_catalog] if p.num_rows]
    cat = pa.concat_tables(cats, promote_options="default").combine_chunks() if cats else _EMPTY_CATALOG
    states = [p for p in pieces[n_catalog:] if p.num_rows]
    del pieces, cats
    firsts, rejects = _dedupe(cat)
    raw = _chain(pa.concat_tables(states)) if states else _state(empty_state(), 0)
    del states
    state = _resolve(raw)
    pos = _positions(state.column("product_id"), firsts.column("product_id"))  # -1: not in the catalog
    reuse = _reusable(state, firsts, pos, settings)  # per catalog first row
    present = pos >= 0
    stored = np.bincount(pos[present], minlength=firsts.num_rows) > 0
    action = np.where(reuse, REUSE, np.where(stored, NEW if settings.full else CHANGED, NEW))
    work = _work(firsts.filter(pa.array(~reuse)), pa.array(action[~reuse], pa.string()))
    keep = present.copy()
    keep[present] = reuse[pos[present]]
    kept = _kept(state.filter(pa.array(keep)), firsts, pos[keep])
    n_state = state.num_rows
    del state
    base = raw.filter(pc.equal(raw.column("source"), 0))
    del raw
    at = _positions(base.column("product_id"), firsts.column("product_id"))
    from_base = kept.filter(pc.equal(kept.column("source"), 0)).column("product_id")
    stays = pc.is_in(base.column("product_id"), value_set=_arr(from_base)).to_numpy(zero_copy_only=False)
    removed = base.filter(pa.array(~stays)).select(REMOVED_SCHEMA.names).cast(REMOVED_SCHEMA)
    gone = pc.count_distinct(base.column("product_id").filter(pa.array(at < 0))).as_py()
    is_work = at >= 0
    is_work[is_work] = ~reuse[at[is_work]]
    base_changed = pa.table({"product_id": pc.unique(base.column("product_id").filter(pa.array(is_work)))})
    per_category = pc.value_counts(kept.column("category")).to_pylist() if kept.num_rows else []
    summary = {"counts": {"rows_in": cat.num_rows, "duplicates": rejects.num_rows,
                          "new": int((action == NEW).sum()), "changed": int((action == CHANGED).sum()),
                          "unchanged_reused": int(reuse.sum()), "work": work.num_rows,
                          "kept_objects": kept.num_rows, "gone": gone, "state_rows": n_state,
                          "resumed": pc.sum(pc.greater(kept.column("source"), 0)).as_py() or 0},
               "categories": {c["values"]: c["counts"] for c in per_category}, "peak_rss_mb": peak_rss_mb()}
    return summary, work, rejects, kept, removed, base_changed


_EMPTY_CATALOG = pa.table({"product_id": pa.array([], pa.string()), "image_url": pa.array([], pa.string()),
                           "category": pa.array([], pa.string()), "content_key": pa.array([], pa.string()),
                           "row": pa.array([], pa.int64())})


def _arr(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _positions(values, value_set) -> np.ndarray:
    """Index of each value's first occurrence in ``value_set`` (-1: absent or null), int64."""
    found = pc.index_in(_arr(values), value_set=_arr(value_set), skip_nulls=True)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _dedupe(cat: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(first row of each product_id in row order, REJECT_SCHEMA rows of the later ones).
    Null ids are never duplicates."""
    rows = cat.column("row").to_numpy()
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        cat = cat.take(pa.array(np.argsort(rows, kind="stable")))
    pid = cat.column("product_id")
    first_at = _positions(pid, pid)
    later = (first_at >= 0) & (first_at != np.arange(cat.num_rows))
    if not later.any():
        return cat, REJECT_SCHEMA.empty_table()
    dups = cat.filter(pa.array(later))
    kept_url = pc.take(cat.column("image_url"), pa.array(first_at[later]))
    detail = pc.binary_join_element_wise("product_id seen earlier in this catalog (kept ",
                                         pc.fill_null(kept_url, ""), ")", "")
    rejects = pa.table({"product_id": dups.column("product_id"), "image_url": dups.column("image_url"),
                        "category": dups.column("category"),
                        "reason": pa.array(["duplicate_product_id"] * dups.num_rows, pa.string()),
                        "detail": detail}, schema=REJECT_SCHEMA)
    return cat.filter(pa.array(~later)), rejects


def _resolve(state: pa.Table) -> pa.Table:
    """Per product, the objects of its latest source, each category once (first stored wins)."""
    if state.num_rows == 0:
        return state
    state = state.combine_chunks()
    pid = state.column("product_id")
    group = _positions(pid, pc.unique(pid))
    source = state.column("source").to_numpy()
    if source.max() > 0:
        latest = np.zeros(group.max() + 1, np.int32)
        np.maximum.at(latest, group, source)
        keep = source == latest[group]
        state, group = state.filter(pa.array(keep)), group[keep]
    category = _positions(state.column("category"), pc.unique(state.column("category")))
    key = group * (category.max() + 2) + category + 1
    _, first = np.unique(key, return_index=True)
    if len(first) == state.num_rows:
        return state
    return state.take(pa.array(np.sort(first)))


def _expected_version(category, settings: Settings) -> pa.Array:
    if not settings.versions:
        return pa.array([settings.default_version] * len(category), pa.string())
    names = pa.array(list(settings.versions), pa.string())
    picked = pc.take(pa.array(list(settings.versions.values()), pa.string()), pc.index_in(category, value_set=names))
    return pc.fill_null(picked, settings.default_version)


def _reusable(state: pa.Table, firsts: pa.Table, pos: np.ndarray, settings: Settings) -> np.ndarray:
    """Per catalog row: every stored object of its product is current (same key, category,
    detector and model), as many as the product was stored with, its own category among them."""
    n = firsts.num_rows
    present = pos >= 0
    if settings.full or not present.any():
        return np.zeros(n, bool)
    s = state.filter(pa.array(present))
    at = pa.array(pos[present])
    ok = pc.and_kleene(pc.and_kleene(pc.equal(s.column("content_key"), pc.take(firsts.column("content_key"), at)),
                                     pc.equal(s.column("catalog_category"), pc.take(firsts.column("category"), at))),
                       pc.and_kleene(pc.equal(s.column("detect_version"), settings.detect_version),
                                     pc.equal(s.column("model_version"),
                                              _expected_version(s.column("category"), settings))))
    ok = pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
    own = pc.fill_null(pc.equal(s.column("category"), pc.take(firsts.column("category"), at)),
                       False).to_numpy(zero_copy_only=False)
    p = pos[present]
    count = np.bincount(p, minlength=n)
    objects = pc.fill_null(s.column("objects"), -1).to_numpy(zero_copy_only=False)
    bad = np.bincount(p, weights=(~ok) | (objects != count[p]), minlength=n)
    return (count > 0) & (bad == 0) & (np.bincount(p, weights=own, minlength=n) > 0)


def _kept(state: pa.Table, firsts: pa.Table, pos: np.ndarray) -> pa.Table:
    """KEPT_SCHEMA rows of reused objects (the URL is the catalog's)."""
    cols = {name: state.column(name) for name in KEPT_SCHEMA.names if name != "image_url"}
    cols["image_url"] = pc.take(firsts.column("image_url"), pa.array(pos))
    return pa.table(cols).select(KEPT_SCHEMA.names).cast(KEPT_SCHEMA)


def _work(rows: pa.Table, action: pa.Array) -> pa.Table:
    """Rows to compute, in catalog order, with PLAN_FIELDS (one object each until detection)."""
    n = rows.num_rows
    extra = {"content_key": rows.column("content_key"), "action": action,
             "catalog_category": rows.column("category"), "catalog_row": rows.column("row"),
             "object": pa.array(np.zeros(n, np.int32)), "objects": pa.array(np.ones(n, np.int32)),
             "note": pa.nulls(n, pa.string())}
    rows = rows.drop_columns(["content_key", "row"])
    for field in PLAN_FIELDS:
        col = extra[field.name]
        col = col.cast(field.type) if col.type != field.type else col
        rows = rows.append_column(field, col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col]))
    return rows
