"""One pipeline run: source -> download -> embed -> store -> index -> validate -> publish.

The streaming part is one Ray Data plan (progress bars per operator); the driver only sees
small outcome rows. The run ends with ``runs/<run_id>/report.json`` whatever happens, and
returns normally only when an index was validated and published.
"""
from __future__ import annotations

import collections
import logging
import math
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import (catalog, compact, delta, display, download, features, gc, index, manifest, metrics, notify,
                    onetask, plan, publish, raycluster, tombstones, validate)
from engine.config import Config
from engine.detect import DetectStage
from engine.embed import EmbedStage
from engine.report import Report
from engine.storage import Storage

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0
EAGER_SMALL = 2  # lookalike compact merges a category's small files as soon as there are two
ROWS_PER_MODEL_ACTOR = 512  # below this many rows a second detect/embed actor costs more to start than it saves


class RunFailed(RuntimeError):
    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def check_fits(cfg: Config, cluster_cpus: float, cluster_gpus: float = 0.0) -> None:
    """Actor pools hold their CPUs (and GPUs) for the whole run; if they leave less than one CPU for
    the catalog listing task, or ask for more GPUs than exist, Ray Data waits forever. Say so up front."""
    pools = [("plan", 1, catalog.READ_CPUS, 0.0), ("download", cfg.download.actors, cfg.download.cpus_per_actor, 0.0),
             ("embed", cfg.embed.actors, cfg.embed.cpus_per_actor, cfg.embed.gpus_per_actor)]
    if cfg.detect.in_pipeline:
        pools.append(("detect", cfg.detect.actors, cfg.detect.cpus_per_actor, cfg.detect.gpus_per_actor))
    held = sum(n * c for _, n, c, _ in pools)
    if held + 1 > cluster_cpus + 1e-9:
        raise RunFailed(
            f"the actor pools hold {held:g} CPUs ({', '.join(f'{p} {n}x{c:g}' for p, n, c, _ in pools)}) and the "
            f"cluster has {cluster_cpus:g}; at least one CPU must stay free for reading the catalog. Lower "
            f"embed.cpus_per_actor, detect.cpus_per_actor or the actor counts.", {})
    gpus = sum(n * g for _, n, _, g in pools)
    if cluster_gpus and gpus > cluster_gpus + 1e-9:
        raise RunFailed(
            f"the detect and embed pools ask for {gpus:g} GPUs (actors x gpus_per_actor) and the cluster has "
            f"{cluster_gpus:g}. Lower embed.gpus_per_actor, detect.gpus_per_actor or the actor counts.", {})


def check_reject_ratio(report: dict, ceiling: float) -> None:
    """Too many rejects means something is wrong upstream (a host down, a bad export): fail the
    run before anything is indexed or published."""
    counts = report["counts"]
    ratio = counts["rejected"] / counts["rows_in"] if counts["rows_in"] else 0.0
    if ratio > ceiling:
        top = sorted(report["rejects_by_reason"].items(), key=lambda kv: -kv[1])[:3]
        raise RunFailed(f"{counts['rejected']} of {counts['rows_in']} rows rejected ({ratio:.1%}), above "
                        f"download.max_reject_ratio={ceiling:g}; nothing published. Top reasons: "
                        + ", ".join(f"{k} {v}" for k, v in top) + " (see rejects.parquet)", report)


def pool(configured: int, rows: int, per_actor: int) -> int:
    """Actors worth starting for ``rows`` rows: a handful of rows does not start a whole pool."""
    return max(1, min(configured, math.ceil(rows / per_actor)))


def reblock(batch: pa.Table) -> pa.Table:
    """Identity: the map's batch size cuts the planned work into feature-shard-sized blocks."""
    return batch


def build_dataset(cfg: Config, run_id: str, device: str, storage: Storage, work: list, rows: int,
                  detect_version: str, throttle=None):
    """The streaming plan over the rows that need computing (``work``: refs of Arrow tables from
    plan.make, ``rows`` of them); nothing runs until it is iterated. ``detect_version``:
    ``cfg.detect.signature()``; ``throttle``: the run's download.Throttle actor (the global rate)."""
    import ray
    from ray.data import ActorPoolStrategy

    gpu = device == "cuda"
    gcs = storage.options  # workers get GCS settings from here, never from the driver's environment
    # Bounded blocks all the way down: each becomes one committed feature shard, so a crash
    # loses at most the shards in flight (a whole-file block would commit only at the end).
    # A quarter-CPU map, not repartition(): its 1-CPU tasks wait forever once the actor pools
    # hold all but a fraction of a small cluster (a run beside the service on one machine).
    ds = ray.data.from_arrow_refs(work).map_batches(reblock, batch_size=cfg.storage.feature_batch_rows,
                                                    batch_format="pyarrow", num_cpus=0.25)
    detecting = cfg.detect.in_pipeline
    fetch = cfg.download.model_copy(update={"actors": pool(cfg.download.actors, rows, 4 * cfg.download.batch_size)})
    ds = download.apply(ds, fetch, cfg.embed.image_size, throttle, storage_options=gcs,
                        full_size=cfg.detect.image_size if detecting else None,
                        max_id_bytes=cfg.catalog.max_id_bytes)
    if detecting:
        ds = ds.map_batches(
            DetectStage, fn_constructor_kwargs={"cfg": cfg.detect.model_dump(), "image_size": cfg.embed.image_size,
                                                "device": device, "storage_options": gcs},
            batch_format="pyarrow", batch_size=cfg.detect.batch_size,
            compute=ActorPoolStrategy(size=pool(cfg.detect.actors, rows, ROWS_PER_MODEL_ACTOR)),
            num_cpus=cfg.detect.cpus_per_actor, num_gpus=cfg.detect.gpus_per_actor if gpu else 0)
    ds = ds.map_batches(
        EmbedStage, fn_constructor_kwargs={"cfg": cfg.embed.model_dump(), "device": device, "storage_options": gcs},
        batch_format="pyarrow", batch_size=cfg.embed.batch_size,
        compute=ActorPoolStrategy(size=pool(cfg.embed.actors, rows, ROWS_PER_MODEL_ACTOR)),
        num_cpus=cfg.embed.cpus_per_actor, num_gpus=cfg.embed.gpus_per_actor if gpu else 0)
    versions = {"": cfg.embed.model_version, **{c: m.model_version for c, m in cfg.embed.categories.items()}}
    return ds.map_batches(
        features.write_batch, fn_kwargs={"root": storage, "versions": versions,
                                         "detect_version": detect_version, "run_id": run_id},
        batch_format="pyarrow", batch_size=cfg.storage.feature_batch_rows, num_cpus=0.25)


REJECT_COLUMNS = tuple(catalog.REJECT_SCHEMA.names)


def make_plan(cfg: Config, storage: Storage, run_id: str, detect_version: str,
              gone: pa.Table | None = None) -> plan.Plan:
    """The run's plan: the catalog joined with the stored state (engine.plan); ``gone``: deletes
    (engine.tombstones) folded in, so those products leave unless the catalog brings them back changed."""
    sources = plan.StateSources.find(storage, cfg.embed.model_version, list(cfg.embed.models()), run_id)
    settings = plan.Settings(detect_version, cfg.plan.full, cfg.embed.model_version,
                             {c: m.model_version for c, m in cfg.embed.categories.items()})
    shown = tuple(cfg.serve.display_columns)
    pieces = catalog.parts(cfg.source, storage_options=storage.options, extra=tuple(cfg.index.filter_columns),
                           optional=shown)
    started = time.monotonic()
    blocks, refused = catalog.blocks(pieces, cfg.source.limit)
    read_s = time.monotonic() - started
    change = plan.make(blocks, sources, settings, cfg.plan.bucket_rows, cfg.index.filter_columns,
                       display.wanted(cfg), gone=gone, refused=refused)
    change.seconds["read"] = round(change.seconds["read"] + read_s, 3)  # the read tasks, then the count
    return change


def start_counts(report: Report, change: plan.Plan) -> None:
    """The plan's counts; the stream adds ok, rejected and objects of the rows it computes."""
    c = change.counts
    report.data["counts"].update(
        rows_in=c.get("rows_in", 0), new=c.get("new", 0), changed=c.get("changed", 0),
        unchanged_reused=c.get("unchanged_reused", 0), processed=c.get("new", 0) + c.get("changed", 0),
        duplicates=c.get("duplicates", 0), rejected=c.get("duplicates", 0) + c.get("malformed", 0),
        objects=c.get("kept_objects", 0))
    by_reason = {"duplicate_product_id": c.get("duplicates", 0), "malformed_row": c.get("malformed", 0)}
    report.data["rejects_by_reason"] = {k: v for k, v in by_reason.items() if v}


def outcomes(cfg: Config, report: Report, run_id: str, device: str, storage: Storage, change: plan.Plan,
             detect_version: str, throttle=None):
    """The work rows' outcome batches: computed in one task when there are few of them
    (``plan.one_task_rows``, engine.onetask), else streamed through the actor pools. The report
    says which (``compute``) and where the seconds went."""
    import ray

    work = change.counts.get("work", 0)
    pools = {"download": (cfg.download.actors, download.CALLS_PER_ACTOR), "detect": (cfg.detect.actors, 1),
             "embed": (cfg.embed.actors, 1)}
    caps = {"download": cfg.download.max_rps}
    if work <= cfg.plan.one_task_rows:
        table, stats = onetask.submit(cfg, run_id, device, storage, change.work, detect_version, throttle)
        table, stats = ray.get(table), ray.get(stats)
        report.data["compute"] = {"mode": "one_task", **stats}
        report.measure_task(stats, pools, caps)
        if table is not None:
            yield table
        return
    ds = build_dataset(cfg, run_id, device, storage, change.work, work, detect_version, throttle)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    report.data["compute"] = {"mode": "stream"}
    report.measure(ds, pools, caps)


def _consume(batches, report: Report, storage: Storage, run_id: str, cfg: Config, detect_version: str,
             change: plan.Plan) -> tuple[pa.Table, pa.Array]:
    """Count the outcomes (``batches``, from ``outcomes``; per catalog row: its first object) with
    Arrow compute, write rejects.parquet (the plan's duplicates, then the stream's rejects), and return this run's
    STATE rows (one per product and category computed) and the product_ids of changed rows
    rejected again."""
    import ray

    counts = report.data["counts"]
    reasons = collections.Counter(report.data.get("rejects_by_reason", {}))
    added, again, shown = [], [], time.time()
    versions = plan.Settings(detect_version, False, cfg.embed.model_version,
                             {c: m.model_version for c, m in cfg.embed.categories.items()})
    storage.makedirs("runs", run_id)
    with pq.ParquetWriter(storage.path("runs", run_id, "rejects.parquet"), catalog.REJECT_SCHEMA,
                          filesystem=storage.fs) as rejects:
        for ref in change.rejects:
            rejects.write_table(ray.get(ref))
        for batch in batches:
            first = pc.fill_null(pc.equal(batch.column("object"), 0), True)
            bad = pc.fill_null(pc.equal(batch.column("status"), "rejected"), False)
            ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
            out = batch.filter(pc.and_(first, bad))
            counts["rejected"] += out.num_rows
            counts["ok"] += pc.sum(pc.and_(first, ok)).as_py() or 0
            counts["objects"] += batch.num_rows - (pc.sum(bad).as_py() or 0)
            if out.num_rows:
                for r in pc.value_counts(out.column("reason")).to_pylist():  # one entry per distinct reason
                    reasons[r["values"]] += r["counts"]
                rejects.write_table(out.select(REJECT_COLUMNS).cast(catalog.REJECT_SCHEMA))
                again.append(out.filter(pc.equal(out.column("action"), plan.CHANGED)).column("product_id"))
            if pc.any(ok).as_py():
                added.append(_manifest_rows(batch.filter(ok), versions))
            report.data["rejects_by_reason"] = dict(sorted(reasons.items()))
            report.progress()
            if time.time() - shown > PROGRESS_EVERY_S:
                shown = time.time()
                log.info("progress: %s; rejects by reason %s", counts, report.data["rejects_by_reason"])
    report.data["rejects_by_reason"] = dict(sorted(reasons.items()))
    added = pa.concat_tables(added) if added else manifest.empty_state()
    again = pa.chunked_array([c for a in again for c in a.chunks], pa.string()) if again else pa.array([], pa.string())
    return added, again


def _manifest_rows(ok: pa.Table, versions: plan.Settings) -> pa.Table:
    """STATE rows of a batch's ok objects, located where the feature store wrote them."""
    n = ok.num_rows
    cols = {"product_id": ok.column("product_id"), "image_url": ok.column("image_url"),
            "category": ok.column("category"), "catalog_category": ok.column("catalog_category"),
            "content_key": ok.column("content_key"), "file": ok.column("file"), "row": ok.column("row"),
            "model_version": plan._expected_version(ok.column("category"), versions),
            "detect_version": pa.array([versions.detect_version] * n, pa.string()), "objects": ok.column("objects")}
    return pa.table(cols).select(manifest.STATE_SCHEMA.names).cast(manifest.STATE_SCHEMA)


def _removed(change: plan.Plan, again: pa.Array) -> int:
    """Products of the published index this run drops: gone from the catalog, or changed and
    rejected this time."""
    import ray

    if not len(again):
        return change.counts.get("gone", 0)
    base = [t.column("product_id") for t in ray.get(change.base_changed) if t.num_rows]
    if not base:
        return change.counts.get("gone", 0)
    value_set = pa.chunked_array(base).combine_chunks()
    hit = pc.is_in(pc.unique(again), value_set=value_set)
    return change.counts.get("gone", 0) + (pc.sum(hit).as_py() or 0)


def _categories(change: plan.Plan, added: pa.Table) -> dict:
    """Objects per category the new index holds: reused plus computed."""
    out = collections.Counter(change.categories)
    for r in (pc.value_counts(added.column("category")).to_pylist() if added.num_rows else []):
        out[r["values"]] += r["counts"]
    return dict(sorted(out.items()))


def _change(change: plan.Plan) -> tuple[pa.Table, pa.Table]:
    """(kept rows resumed from pending runs, published rows that leave): with this run's added
    rows, the delta from the published state to the new one. Reused published rows stay put."""
    import ray

    resumed = [t.filter(pc.greater(t.column("source"), 0)).drop_columns(["source"]) for t in ray.get(change.resumed)]
    resumed = [t for t in resumed if t.num_rows]
    removed = [t for t in ray.get(change.removed) if t.num_rows]
    none = manifest.REMOVED_SCHEMA.empty_table()
    return (pa.concat_tables(resumed).cast(manifest.STATE_SCHEMA) if resumed else manifest.empty_state(),
            pa.concat_tables(removed).cast(manifest.REMOVED_SCHEMA) if removed else none)


def base_state(storage: Storage, model_version: str, base: publish.Pointer) -> tuple[str | None, pa.Table]:
    """(version, state) of the published manifest a run builds on ((None, empty) when there is none)."""
    if base.version and manifest.exists(storage, model_version, base.version):
        return base.version, manifest.read_state(storage, model_version, base.version)
    return None, manifest.empty_state()


def finish(cfg: Config, storage: Storage, report: Report, version: str, base: publish.Pointer,
           added: pa.Table, removed: pa.Table, min_small: int | None = None,
           attributes: list | None = None, shown: list | None = None, seen: list[str] | None = None) -> None:
    """After the stream: compact, commit the manifest (a delta on the published one), build the
    index (categories nobody changed keep their shards), validate, publish, collect garbage.

    ``added``: STATE rows new in this version; ``removed``: (product_id, category) of published
    rows that leave; ``min_small``: see compact.choose; ``shown``: the plan's display projections
    (engine.display; None: the version's categories keep the display files they had); ``seen``: the
    base's tombstone files the plan folded. Every step writes new things before anything refers to them, and deletes only
    after publish what no kept version refers to, so a crash anywhere is finished by the next run.
    """
    mv = cfg.embed.model_version
    base_version = base.version if base.version and manifest.exists(storage, mv, base.version) else None
    changed = set(pc.unique(added.column("category")).to_pylist()) | set(pc.unique(removed.column("category")).to_pylist())
    previous = index.read_manifest(storage, mv, base_version) \
        if base_version and storage.exists(*index.version_prefix(mv, base_version), index.MANIFEST) else None
    if previous is not None:  # lookalike update/delete since: merge (rebuild) or carry (engine/delta.py)
        changed |= delta.to_rebuild(storage, previous, cfg.index.rebuild_fraction)
    with report.stage("compact"):
        state, meta = commit_manifest(storage, cfg, report, version, base_version, added, removed, min_small)
    report.data["manifest"] = {k: meta[k] for k in ("rows", "added", "removed", "chain")} | {"files": len(meta["files"])}
    with report.stage("index"):
        built = index.build_version(storage, mv, version, state, cfg.index, base=previous, changed=changed,
                                    attributes=attributes, display=display_sources(cfg, shown))
    report.data["index_build"] = built["build"]
    report.data["index_version"] = version
    with report.stage("validate"):
        result = validate.validate(storage, mv, version, cfg.index.validate_, expected=meta["categories"])
    report.data["validation"] = result
    if not result["ok"]:
        raise RunFailed("index failed validation, not published: " + "; ".join(result["failures"]), report.data)
    with report.stage("publish"):
        report.data["publish"] = publish.publish(storage, mv, version, cfg.storage.keep_versions, expected=base)
        if seen is not None:  # deletes written to the old version while this run worked
            report.data["publish"]["late_deletes_carried"] = tombstones.carry(storage, mv, base.version, version, seen)
    with report.stage("gc"):
        report.data["gc"] = gc.collect(storage, mv, cfg.storage.keep_versions)
    report.data["index_uri"] = storage.uri(*index.version_prefix(mv, version))


def display_sources(cfg: Config, projections: list | None):
    """What the version's display files (titles, thumbnails) are made of; None: keep the ones it had."""
    return display.Sources(projections, display.wanted(cfg)) if projections is not None else None


def commit_manifest(storage: Storage, cfg: Config, report: Report, version: str, base_version: str | None,
                    added: pa.Table, removed: pa.Table, min_small: int | None = None):
    """(state, meta): the new state (manifest.LEAN_SCHEMA), compacted, committed as a delta on
    ``base_version``.

    The driver holds one lean copy of the state and nothing per row beside it: the new state is
    read from the published chain with ``removed`` and replaced rows dropped a batch at a time,
    and the delta is what this run added, removed and compaction moved, known without a join.
    """
    mv = cfg.embed.model_version
    state = manifest.next_state(storage, mv, base_version, added, removed)
    base_meta = manifest.read_meta(storage, mv, base_version) if base_version else None
    files = manifest.file_catalog(storage, state, base_meta["files"] if base_meta else {})
    state, stats = compact.compact(storage, state, files, cfg.features.target_file_mb, version, min_small)
    written = stats.pop("written", [])
    report.data["compaction"] = stats
    delta_added, delta_removed = added, removed
    if written:
        moved = state.filter(pc.is_in(state.column("file"), value_set=pa.array(written, pa.string())))
        delta_added = manifest.apply(manifest.lean(added), moved, manifest.REMOVED_SCHEMA.empty_table())
        delta_removed = pa.concat_tables([removed.select(manifest.KEY).cast(manifest.REMOVED_SCHEMA),
                                          moved.select(manifest.KEY).cast(manifest.REMOVED_SCHEMA)])
    meta = manifest.write(storage, mv, version, base_version, delta_added, delta_removed, state=state)
    return state, meta


def _unchanged(counts: dict) -> bool:
    """No new features and nobody gone: the published index already says everything.

    Rows rejected again (a URL still dead) do not count as change; they are retried every run.
    """
    return counts["ok"] == 0 and counts["removed"] == 0 and counts["duplicates"] == 0


def _folding(storage: Storage, mv: str, base: publish.Pointer, cfg: Config) -> bool:
    """The published version has deltas or tombstones a run must merge, even if the catalog is unchanged."""
    if not base.version or not storage.exists(*index.version_prefix(mv, base.version), index.MANIFEST):
        return False
    return delta.pending(storage, index.read_manifest(storage, mv, base.version), cfg.index.rebuild_fraction)


def _plan_throughput(report: Report, change) -> None:
    """The catalog read and the bucket plan run as Ray tasks before the stream: their measured
    rates (catalog rows over wall seconds, the tasks' parallelism included) go into the projection."""
    rows, secs = change.counts.get("rows_in", 0), change.seconds
    stages = {"read": secs.get("read", 0.0), "plan": secs.get("split", 0.0) + secs.get("join", 0.0)}
    report.data.setdefault("throughput", {}).update(
        {name: {"rows": rows, "busy_s": round(s, 3), "actors": None, "calls_per_actor": 1, "parallelism": 1.0}
         for name, s in stages.items() if rows and s > 0})


def run(cfg: Config, run_id: str | None = None) -> dict:
    """Run once; returns the report, or raises RunFailed (the report is written either way)."""
    run_id = run_id or new_run_id()
    storage = Storage.from_config(cfg.storage)
    mv = cfg.embed.model_version
    report = Report(run_id, mv, storage)
    report.observe(metrics.RunMetrics(storage), notify.RunNotifier(cfg), metrics.RunPush(cfg))  # dashboard, Slack, Pushgateway
    try:
        with report.stage("connect"):
            raycluster.connect(cfg.ray)
            device = raycluster.embed_device(cfg.embed.device)
            check_fits(cfg, raycluster.cpus_available(),
                       raycluster.gpus_available() if device == "cuda" else 0.0)
            report.data["device"] = device
            base = publish.read_pointer(storage, mv)  # publish succeeds only if LATEST is still this
            seen = tombstones.names(storage, mv, base.version) if base.version else []
            gone = tombstones.deletes(tombstones.read(storage, mv, base.version, only=seen)) if seen else None
        with report.stage("plan"):
            detect_version = cfg.detect.signature()  # hashes the detector's weights: once a run
            change = make_plan(cfg, storage, run_id, detect_version, gone)
            report.data["plan"] = {"deletes_folded": gone.num_rows if gone is not None else 0}
            start_counts(report, change)
            report.data["known_features"] = change.counts.get("state_rows", 0)
            report.data["plan"] |= {"buckets": change.buckets, "work_rows": change.counts.get("work", 0),
                                   "peak_rss_mb": change.peak_rss_mb, "seconds": change.seconds}
            _plan_throughput(report, change)
        work = change.counts.get("work", 0)
        if work:
            with report.stage("download_embed_store"), download.throttle(cfg.download) as throttle:
                batches = outcomes(cfg, report, run_id, device, storage, change, detect_version, throttle)
                fresh, again = _consume(batches, report, storage, run_id, cfg, detect_version, change)
                report.data["download"] = download.stats(throttle)
            report.rate("download_embed_store", report.data["counts"]["ok"])
        else:  # nothing to compute: no stream, no actor pools
            fresh, again = _consume((), report, storage, run_id, cfg, detect_version, change)
        counts = report.data["counts"]
        counts["removed"] = _removed(change, again)
        counts["indexed"] = change.counts.get("kept_objects", 0) + fresh.num_rows
        report.data["categories"] = _categories(change, fresh)
        if counts["indexed"] == 0:
            raise RunFailed("no image could be processed; nothing to index (see rejects.parquet)", report.data)
        check_reject_ratio(report.data, cfg.download.max_reject_ratio)
        if not cfg.plan.publish_unchanged and _unchanged(counts) and not change.counts.get("resumed") \
                and not _folding(storage, mv, base, cfg):
            report.data["index_version"] = publish.latest(storage, mv)
            report.finish("unchanged")
            return report.data
        resumed, removed = _change(change)
        finish(cfg, storage, report, run_id, base, pa.concat_tables([fresh, resumed]), removed, attributes=change.attributes, shown=change.display,
               seen=seen)
        report.finish("published")
        return report.data
    except (RunFailed, catalog.CatalogError, publish.PublishConflict) as exc:
        said = str(_raised(exc))
        report.finish("failed", error=said)
        raise RunFailed(said, report.data) from None
    except Exception as exc:
        report.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise RunFailed(f"{report.current or 'run'} failed: {type(exc).__name__}: {exc}", report.data) from exc


def _raised(exc: Exception) -> Exception:
    """The error as a Ray task raised it: a RayTaskError's own text is the remote traceback."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def update(cfg: Config, run_id: str | None = None) -> dict:
    """One delta run; returns its report (``status`` published or unchanged) or raises RunFailed."""
    t0 = time.monotonic()
    run_id = run_id or new_run_id()
    storage = Storage.from_config(cfg.storage)
    mv = cfg.embed.model_version
    report = Report(run_id, mv, storage)
    report.data["kind"] = "update"
    try:
        with report.stage("connect"):
            raycluster.connect(cfg.ray)
            device = raycluster.embed_device(cfg.embed.device)
            base = publish.read_pointer(storage, mv)
            if not base.version or not manifest.exists(storage, mv, base.version):
                raise RunFailed(f"nothing published for {mv} to update; run `lookalike run` first", report.data)
            seen = tombstones.names(storage, mv, base.version)
        with report.stage("plan"):
            detect_version = cfg.detect.signature()
            change = make_plan(cfg, storage, run_id, detect_version)
            start_counts(report, change)
        work = change.counts.get("work", 0)
        if not work:
            report.data["index_version"] = base.version
            report.finish("unchanged")
            return report.data
        with report.stage("download_embed_store"), download.throttle(cfg.download) as throttle:
            batches = outcomes(cfg, report, run_id, device, storage, change, detect_version, throttle)
            fresh, _ = _consume(batches, report, storage, run_id, cfg, detect_version, change)
        report.data["counts"]["indexed"] = fresh.num_rows
        if not fresh.num_rows:
            raise RunFailed("no row of the update could be processed; nothing published (see rejects.parquet)",
                            report.data)
        with report.stage("index"):
            base_manifest = index.read_manifest(storage, mv, base.version)
            before = manifest.read_state(storage, mv, base.version, columns=["content_key"])
            built = delta.build_delta(cfg, storage, run_id, base_manifest, before, fresh, change.attributes,
                                      display_sources(cfg, change.display))
        report.data["delta"] = built
        with report.stage("publish"):
            report.data["publish"] = publish.publish(storage, mv, run_id, cfg.storage.keep_versions, expected=base)
            report.data["delta"]["late_deletes_carried"] = tombstones.carry(storage, mv, base.version, run_id, seen)
        report.data["index_version"] = run_id
        report.data["seconds"] = round(time.monotonic() - t0, 3)
        report.finish("published")
        return report.data
    except (RunFailed, publish.PublishConflict) as exc:
        report.finish("failed", error=str(exc))
        raise RunFailed(str(exc), report.data) from None
    except Exception as exc:
        report.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise RunFailed(f"{report.current or 'update'} failed: {type(exc).__name__}: {exc}", report.data) from exc


def compact_store(cfg: Config, version: str | None = None) -> dict:
    """``lookalike compact``: compact the published state now, as its own version.

    The new version holds the same objects (every category keeps its shards by reference) with
    its feature files merged; it is validated and published like a run, then garbage is collected.
    Nothing to merge: nothing is written.
    """
    version = version or new_run_id()
    storage = Storage.from_config(cfg.storage)
    mv = cfg.embed.model_version
    report = Report(version, mv, storage)
    try:
        raycluster.connect(cfg.ray)
        base = publish.read_pointer(storage, mv)
        base_version = base.version if base.version and manifest.exists(storage, mv, base.version) else None
        if base_version is None:
            raise RunFailed(f"nothing to compact: {mv} has no published version with a manifest", report.data)
        files = manifest.read_meta(storage, mv, base_version)["files"]
        if not compact.choose(files, int(cfg.features.target_file_mb * compact.MIB), EAGER_SMALL):
            report.data["compaction"] = {"files_in": 0, "files_out": 0, "rows_moved": 0}
            report.data["index_version"] = base_version
            report.finish("unchanged")
            return report.data
        empty = manifest.empty_state()
        finish(cfg, storage, report, version, base, empty, empty.select(manifest.KEY), EAGER_SMALL)
        report.finish("published")
        return report.data
    except RunFailed as exc:
        report.finish("failed", error=str(exc))
        raise
    except publish.PublishConflict as exc:
        report.finish("failed", error=str(exc))
        raise RunFailed(str(exc), report.data) from None
