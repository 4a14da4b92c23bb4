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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import features, partition, publish
from engine.storage import Storage

NEW, CHANGED, REUSE, DUPLICATE = "new", "changed", "reuse", "duplicate"
PLAN_FIELDS = [pa.field("content_key", pa.string()), pa.field("action", pa.string()),
               pa.field("source_run", pa.string()), pa.field("catalog_category", pa.string()),
               pa.field("row", pa.int64()), pa.field("object", pa.int32()), pa.field("objects", pa.int32()),
               pa.field("note", pa.string())]
STATE_COLUMNS = ["product_id", "content_key", "category", "catalog_category", "source_run", "model_version",
                 "detect_version", "objects"]
STATE_SCHEMA = pa.schema([pa.field(c, pa.int32() if c == "objects" else pa.string()) for c in STATE_COLUMNS])
REJECT_SCHEMA = pa.schema([(c, pa.string()) for c in ("product_id", "image_url", "category", "reason", "detail")])
KEPT_SCHEMA = features.MANIFEST_SCHEMA.append(pa.field("source", pa.int32()))
REMOVED_SCHEMA = pa.schema([("product_id", pa.string()), ("category", pa.string())])


def empty_state() -> pa.Table:
    return STATE_SCHEMA.empty_table()


def content_key(image_url, updated_at) -> str:
    raw = f"{image_url or ''}\x00{'' if updated_at is None else updated_at}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def content_keys(batch: pa.Table) -> pa.Array:
    """``content_key`` of each row of one block (hashlib has no vectorised form; one block at a time)."""
    urls = batch.column("image_url").to_pylist()
    stamps = batch.column("updated_at").cast(pa.string()).to_pylist() if "updated_at" in batch.column_names \
        else [None] * len(urls)
    return pa.array([content_key(u, s) for u, s in zip(urls, stamps)], pa.string())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the previous state ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StateSources:
    """Where the previous state lives: the published manifest (source 0) and, after it, committed
    features of runs that never published (sources 1..., oldest first; later sources win).

    The one place that knows the stored layout: swap for engine.manifest's read_state /
    pending_state when the manifest is a base plus deltas.
    """

    storage: Storage
    line: str
    published: str | None
    orphans: tuple[tuple[str, str], ...]  # (run_id, model_version)
    rows: int

    @classmethod
    def find(cls, storage: Storage, line: str, model_versions: list[str], current_run: str) -> "StateSources":
        published = publish.latest(storage, line)
        path = features.manifest_path(line, published) if published else None
        rows, since = 0, ""
        if path and storage.exists(*path):
            meta = pq.ParquetFile(storage.path(*path), filesystem=storage.fs)
            rows, since = meta.metadata.num_rows, _column_max(meta, "source_run")
        else:
            published = None
        orphans = tuple(sorted((run_id, mv) for mv in dict.fromkeys(model_versions)
                               for run_id in features.runs(storage, mv) if run_id > since and run_id != current_run))
        return cls(storage, line, published, orphans, rows)

    def read(self, i: int, n: int) -> pa.Table:
        """STATE_SCHEMA rows of bucket ``i`` of ``n``, plus ``source`` (int32), in source order."""
        parts = []
        if self.published:
            f = pq.ParquetFile(self.storage.path(*features.manifest_path(self.line, self.published)),
                               filesystem=self.storage.fs)
            names = [c for c in STATE_COLUMNS if c in f.schema_arrow.names]
            for batch in f.iter_batches(batch_size=65536, columns=names):
                t = pa.Table.from_batches([batch])
                t = t.filter(pc.equal(partition.bucket(t.column("product_id"), n), i))
                parts.append(_state(features._complete(t, self.line), 0))
        for source, (run_id, mv) in enumerate(self.orphans, 1):
            t = features.read_run_keys(self.storage, mv, run_id)
            parts.append(_state(t.filter(pc.equal(partition.bucket(t.column("product_id"), n), i)), source))
        return pa.concat_tables(parts) if parts else _state(empty_state(), 0)


def _state(t: pa.Table, source: int) -> pa.Table:
    t = t.select(STATE_COLUMNS).cast(STATE_SCHEMA)
    return t.append_column("source", pa.array(np.full(t.num_rows, source, np.int32)))


def _column_max(f: pq.ParquetFile, column: str) -> str:
    """Max of a string column, from row-group statistics when written, else streamed."""
    idx = f.schema_arrow.get_field_index(column)
    if idx < 0:
        return ""
    stats = [f.metadata.row_group(g).column(idx).statistics for g in range(f.metadata.num_row_groups)]
    if stats and all(s is not None and s.has_min_max for s in stats):
        return max(s.max for s in stats) or ""
    best = ""
    for batch in f.iter_batches(columns=[column]):
        best = max(best, pc.max(batch.column(0)).as_py() or "")
    return best


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
    counts: dict        # rows_in, new, changed, unchanged_reused, duplicates, gone, work, kept_objects, state_rows
    categories: dict    # category -> reused objects
    work: list          # refs: Arrow tables of new/changed rows (catalog columns + PLAN_FIELDS), non-empty only
    rejects: list       # refs: REJECT_SCHEMA tables (duplicates)
    kept: list          # refs: KEPT_SCHEMA (manifest rows of reused objects; source 0 = published)
    removed: list       # refs: REMOVED_SCHEMA, published rows that leave (changed or gone)
    base_changed: list  # refs: product_id of published products that are work (removed if rejected again)
    peak_rss_mb: dict   # task kind -> largest peak RSS a task of it reported


def buckets_for(rows: int, bucket_rows: int) -> int:
    return max(1, math.ceil(rows / bucket_rows))


def make(ds, sources: StateSources, settings: Settings, bucket_rows: int) -> Plan:
    """Plan the catalog dataset ``ds`` against ``sources``; runs Ray tasks, returns when planned."""
    import ray

    ds.context.execution_options.preserve_order = True  # catalog order decides which duplicate wins
    catalog = ds.materialize()
    n = buckets_for(max(catalog.count(), sources.rows), bucket_rows)
    split = ray.remote(_split).options(num_returns=n + 1, num_cpus=1)
    pieces: list[list] = [[] for _ in range(n)]
    rss = []
    for seq, ref in enumerate(r for bundle in catalog.iter_internal_ref_bundles() for r in bundle.block_refs):
        out = split.remote(ref, seq, n)
        rss.append(out[0])
        for i in range(n):
            pieces[i].append(out[i + 1])
    split_rss = max(ray.get(rss), default=0.0)
    del catalog
    task = ray.remote(_plan_bucket).options(num_returns=6, num_cpus=1)
    outs = [task.remote(sources, settings, i, n, *pieces[i]) for i in range(n)]
    del pieces
    summaries = ray.get([o[0] for o in outs])
    counts: dict = {}
    categories: dict = {}
    for s in summaries:
        for k, v in s["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in s["categories"].items():
            categories[k] = categories.get(k, 0) + v
    return Plan(n, counts, dict(sorted(categories.items())),
                work=[o[1] for o, s in zip(outs, summaries) if s["counts"]["work"]],
                rejects=[o[2] for o, s in zip(outs, summaries) if s["counts"]["duplicates"]],
                kept=[o[3] for o in outs], removed=[o[4] for o in outs], base_changed=[o[5] for o in outs],
                peak_rss_mb={"split": split_rss, "bucket": max(s["peak_rss_mb"] for s in summaries)})


def _split(block: pa.Table, seq: int, n: int) -> tuple:
    """Ray task: one catalog block -> its rows by bucket, with content_key and row order."""
    from engine.catalog import normalise

    block = normalise(block)
    block = block.append_column("content_key", content_keys(block))
    block = block.append_column("row", pa.array((seq << 32) + np.arange(block.num_rows, dtype=np.int64)))
    b = partition.bucket(block.column("product_id"), n).to_numpy()
    order = np.argsort(b, kind="stable")
    block = block.take(pa.array(order))
    ends = np.cumsum(np.bincount(b, minlength=n))
    starts = ends - np.bincount(b, minlength=n)
    return (peak_rss_mb(), *(block.slice(int(s), int(e - s)) for s, e in zip(starts, ends)))


def _plan_bucket(sources: StateSources, settings: Settings, i: int, n: int, *pieces: pa.Table) -> tuple:
    """Ray task: one bucket's catalog rows joined with its state.

    Returns (summary, work, rejects, kept, removed, base_changed); see ``Plan``."""
    pieces = [p for p in pieces if p.num_rows] or list(pieces[:1])
    cat = pa.concat_tables(pieces, promote_options="default") if pieces else None
    state = sources.read(i, n)
    if cat is None or cat.num_rows == 0:
        cat = pa.table({"product_id": pa.array([], pa.string()), "image_url": pa.array([], pa.string()),
                        "category": pa.array([], pa.string()), "content_key": pa.array([], pa.string()),
                        "row": pa.array([], pa.int64())})
    firsts, rejects = _dedupe(cat)
    state = _resolve(state)
    joined = _join(state, firsts, settings)
    reuse_ids = _reusable(joined, settings)
    stored_ids = pc.unique(joined.column("product_id"))
    pid = firsts.column("product_id")
    is_reuse = pc.fill_null(pc.is_in(pid, value_set=_arr(reuse_ids)), False)
    is_stored = pc.fill_null(pc.is_in(pid, value_set=_arr(stored_ids)), False)
    action = pc.if_else(is_reuse, REUSE, pc.if_else(is_stored, NEW if settings.full else CHANGED, NEW))
    work = _work(firsts.filter(pc.invert(is_reuse)), action.filter(pc.invert(is_reuse)))
    kept = joined.filter(pc.is_in(joined.column("product_id"), value_set=_arr(reuse_ids)))
    kept = kept.select(KEPT_SCHEMA.names).cast(KEPT_SCHEMA)
    base = state.filter(pc.equal(state.column("source"), 0))
    from_base = pc.unique(kept.filter(pc.equal(kept.column("source"), 0)).column("product_id"))
    removed = base.filter(pc.invert(pc.is_in(base.column("product_id"), value_set=_arr(from_base))))
    removed = removed.select(REMOVED_SCHEMA.names).cast(REMOVED_SCHEMA)
    base_ids = pc.unique(base.column("product_id"))
    gone = pc.sum(pc.invert(pc.is_in(base_ids, value_set=_arr(cat.column("product_id"))))).as_py() or 0
    base_changed = pa.table({"product_id": pc.filter(base_ids, pc.is_in(base_ids, value_set=_arr(work.column("product_id"))))})
    cats = pc.value_counts(kept.column("category")) if kept.num_rows else []
    summary = {"counts": {"rows_in": cat.num_rows, "duplicates": rejects.num_rows,
                          "new": _count(action, NEW), "changed": _count(action, CHANGED),
                          "unchanged_reused": _count(action, REUSE), "work": work.num_rows,
                          "kept_objects": kept.num_rows, "gone": gone, "state_rows": state.num_rows},
               "categories": {c["values"].as_py(): c["counts"].as_py() for c in cats},
               "peak_rss_mb": peak_rss_mb()}
    return summary, work, rejects, kept, removed, base_changed


def _arr(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _count(array: pa.Array, value: str) -> int:
    return pc.sum(pc.equal(array, value)).as_py() or 0


def _dedupe(cat: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(first row of each product_id, REJECT_SCHEMA rows of the later ones). Null ids are never duplicates."""
    idx = pa.array(np.arange(cat.num_rows, dtype=np.int64))
    keys = pa.table({"product_id": cat.column("product_id"), "row": cat.column("row"), "i": idx})
    firsts = keys.filter(pc.is_valid(keys.column("product_id"))).group_by("product_id").aggregate([("row", "min")])
    tagged = keys.join(firsts, "product_id", join_type="left outer")
    first = pc.or_kleene(pc.is_null(tagged.column("row_min")), pc.equal(tagged.column("row"), tagged.column("row_min")))
    first = pc.fill_null(first, True)
    keep = pc.sort_indices(tagged.filter(first).column("i"))
    firsts_idx = pc.take(tagged.filter(first).column("i"), keep)
    later = tagged.filter(pc.invert(first))
    out = cat.take(firsts_idx)
    if later.num_rows == 0:
        return out, REJECT_SCHEMA.empty_table()
    dups = cat.take(later.column("i")).select(["product_id", "image_url", "category"])
    kept_url = out.select(["product_id", "image_url"]).rename_columns(["product_id", "kept_url"])
    dups = dups.join(kept_url, "product_id", join_type="left outer")
    detail = pc.binary_join_element_wise("product_id seen earlier in this catalog (kept ",
                                         pc.fill_null(dups.column("kept_url"), ""), ")", "")
    rejects = pa.table({"product_id": dups.column("product_id"), "image_url": dups.column("image_url"),
                        "category": dups.column("category"),
                        "reason": pa.array(["duplicate_product_id"] * dups.num_rows, pa.string()),
                        "detail": detail}, schema=REJECT_SCHEMA)
    return out, rejects


def _resolve(state: pa.Table) -> pa.Table:
    """Per product, the objects of its latest source, each category once (first stored wins)."""
    if state.num_rows == 0:
        return state
    state = state.append_column("i", pa.array(np.arange(state.num_rows, dtype=np.int64)))
    latest = state.group_by("product_id").aggregate([("source", "max")])
    state = state.join(latest, "product_id").filter(
        pc.equal(pc.field("source"), pc.field("source_max"))).drop_columns(["source_max"])
    once = state.group_by(["product_id", "category"]).aggregate([("i", "min")])
    state = state.join(once, ["product_id", "category"]).filter(pc.equal(pc.field("i"), pc.field("i_min")))
    return state.sort_by("i").drop_columns(["i", "i_min"])


def _join(state: pa.Table, firsts: pa.Table, settings: Settings) -> pa.Table:
    """State rows of products in the catalog, next to the catalog's key, category and URL."""
    cat = firsts.select(["product_id", "content_key", "category", "image_url"]).filter(
        pc.is_valid(firsts.column("product_id"))).rename_columns(["product_id", "c_key", "c_cat", "image_url"])
    joined = state.join(cat, "product_id", join_type="inner")
    return joined.combine_chunks() if joined.num_rows else joined


def _expected_version(category: pa.ChunkedArray, settings: Settings) -> pa.Array:
    if not settings.versions:
        return pa.array([settings.default_version] * len(category), pa.string())
    names = pa.array(list(settings.versions), pa.string())
    picked = pc.take(pa.array(list(settings.versions.values()), pa.string()), pc.index_in(category, value_set=names))
    return pc.fill_null(picked, settings.default_version)


def _reusable(joined: pa.Table, settings: Settings) -> pa.Array:
    """product_ids whose stored objects are all current: same key, category, detector and model,
    as many as the product was stored with, its own category among them."""
    if settings.full or joined.num_rows == 0:
        return pa.array([], pa.string())
    ok = pc.and_kleene(pc.and_kleene(pc.equal(joined.column("content_key"), joined.column("c_key")),
                                     pc.equal(joined.column("catalog_category"), joined.column("c_cat"))),
                       pc.and_kleene(pc.equal(joined.column("detect_version"), settings.detect_version),
                                     pc.equal(joined.column("model_version"),
                                              _expected_version(joined.column("category"), settings))))
    flags = pa.table({"product_id": joined.column("product_id"), "objects": joined.column("objects"),
                      "ok": pc.fill_null(ok, False),
                      "own": pc.fill_null(pc.equal(joined.column("category"), joined.column("c_cat")), False)})
    agg = flags.group_by("product_id").aggregate([("ok", "all"), ("own", "any"), ("objects", "min"),
                                                  ("objects", "max"), ("product_id", "count")])
    good = pc.and_(pc.and_(agg.column("ok_all"), agg.column("own_any")),
                   pc.and_(pc.equal(agg.column("objects_min"), agg.column("objects_max")),
                           pc.equal(agg.column("objects_min").cast(pa.int64()), agg.column("product_id_count"))))
    return agg.column("product_id").filter(pc.fill_null(good, False))


def _work(rows: pa.Table, action: pa.Array) -> pa.Table:
    """Rows to compute, in catalog order, with PLAN_FIELDS (one object each until detection)."""
    n = rows.num_rows
    extra = {"content_key": rows.column("content_key"), "action": action, "source_run": pa.nulls(n, pa.string()),
             "catalog_category": rows.column("category"), "row": rows.column("row"),
             "object": pa.array(np.zeros(n, np.int32)), "objects": pa.array(np.ones(n, np.int32)),
             "note": pa.nulls(n, pa.string())}
    rows = rows.drop_columns(["content_key", "row"])
    for field in PLAN_FIELDS:
        col = extra[field.name]
        col = col.cast(field.type) if col.type != field.type else col
        rows = rows.append_column(field, col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col]))
    return rows
