"""One pipeline run: source -> download -> embed -> store -> index -> validate -> publish.

The streaming part is one Ray Data plan (progress bars per operator); the driver only sees
small outcome rows. The run ends with ``runs/<run_id>/report.json`` whatever happens, and
returns normally only when an index was validated and published.
"""
from __future__ import annotations

import collections
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import catalog, download, features, index, metrics, notify, plan, publish, raycluster, validate
from engine.config import Config
from engine.embed import EmbedStage
from engine.report import Report
from engine.storage import Storage

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0


class RunFailed(RuntimeError):
    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def check_fits(cfg: Config, cluster_cpus: float) -> None:
    """Actor pools hold their CPUs for the whole run; if they leave less than one CPU for the
    catalog listing task, Ray Data waits forever. Say so up front instead."""
    held = cfg.download.actors * cfg.download.cpus_per_actor + cfg.embed.actors * cfg.embed.cpus_per_actor
    if held + 1 > cluster_cpus + 1e-9:
        raise RunFailed(
            f"the actor pools hold {held:g} CPUs (download.actors x download.cpus_per_actor + "
            f"embed.actors x embed.cpus_per_actor) and the cluster has {cluster_cpus:g}; at least one "
            f"CPU must stay free for reading the catalog. Lower embed.cpus_per_actor or embed.actors.", {})


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


def build_dataset(cfg: Config, run_id: str, device: str, storage: Storage, known: pa.Table, throttle=None):
    """The streaming plan; nothing runs until it is iterated. ``known``: stored features the plan
    may reuse; ``throttle``: the run's download.Throttle actor (the global request rate)."""
    import ray
    from ray.data import ActorPoolStrategy

    gpu = device == "cuda"
    gcs = storage.options  # workers get GCS settings from here, never from the driver's environment
    ds = catalog.read(cfg.source, storage_options=gcs)
    ds = ds.map_batches(
        plan.PlanStage, fn_constructor_kwargs={"state": [ray.put(known)], "full": cfg.plan.full},
        batch_format="pyarrow", batch_size=cfg.download.batch_size * 4,
        compute=ActorPoolStrategy(size=1), num_cpus=catalog.READ_CPUS)
    # Bounded blocks all the way down: each becomes one committed feature shard, so a crash
    # loses at most the shards in flight (a whole-file block would commit only at the end).
    ds = ds.repartition(target_num_rows_per_block=cfg.storage.feature_batch_rows)
    ds = download.apply(ds, cfg.download, cfg.embed.image_size, throttle, storage_options=gcs)
    ds = ds.map_batches(
        EmbedStage, fn_constructor_kwargs={"cfg": cfg.embed.model_dump(), "device": device, "storage_options": gcs},
        batch_format="pyarrow", batch_size=cfg.embed.batch_size,
        compute=ActorPoolStrategy(size=cfg.embed.actors),
        num_cpus=cfg.embed.cpus_per_actor, num_gpus=cfg.embed.gpus_per_actor if gpu else 0)
    return ds.map_batches(
        features.write_batch, fn_kwargs={"root": storage, "model_version": cfg.embed.model_version,
                                         "run_id": run_id},
        batch_format="pyarrow", batch_size=cfg.storage.feature_batch_rows, num_cpus=0.25)


REJECT_COLUMNS = ("product_id", "image_url", "category", "reason", "detail")


def _consume(ds, report: Report, storage: Storage, run_id: str) -> pa.Table:
    """Count outcomes, write rejects.parquet, and return the manifest rows of this run's products."""
    counts = report.data["counts"]
    counts.update(new=0, changed=0, unchanged_reused=0, processed=0, duplicates=0)
    reasons, rejects, entries, shown = collections.Counter(), [], {}, time.time()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            counts["rows_in"] += 1
            action = row.get("action") or plan.NEW
            counts["unchanged_reused" if action == plan.REUSE else action] += 1
            counts["processed"] += action != plan.REUSE
            status, pid = row["status"], row["product_id"]
            if status != "rejected" and pid in entries:
                counts["duplicates"] += 1
                status, row["reason"] = "rejected", "duplicate_product_id"
                row["detail"] = f"product_id seen earlier in this catalog (kept {entries[pid]['image_url']})"
            if status == "rejected":
                counts["rejected"] += 1
                reasons[row["reason"]] += 1
                rejects.append({c: row.get(c) for c in REJECT_COLUMNS})
                continue
            counts["ok"] += status == "ok"
            entries[pid] = {"product_id": pid, "image_url": row["image_url"], "category": row["category"],
                            "content_key": row["content_key"],
                            "source_run": run_id if status == "ok" else row["source_run"]}
        report.data["rejects_by_reason"] = dict(sorted(reasons.items()))
        report.progress()
        if time.time() - shown > PROGRESS_EVERY_S:
            shown = time.time()
            log.info("progress: %s; rejects by reason %s", counts, report.data["rejects_by_reason"])
    schema = pa.schema([(c, pa.string()) for c in REJECT_COLUMNS])
    storage.makedirs("runs", run_id)
    pq.write_table(pa.Table.from_pylist(rejects, schema=schema), storage.path("runs", run_id, "rejects.parquet"),
                   filesystem=storage.fs)
    manifest = pa.Table.from_pylist(list(entries.values()),
                                    schema=pa.schema([(c, pa.string()) for c in features.MANIFEST_COLUMNS]))
    report.data["categories"] = dict(sorted(collections.Counter(manifest.column("category").to_pylist()).items()))
    return manifest


def _removed(storage: Storage, model_version: str, manifest: pa.Table) -> int:
    """Products of the published index that this run's catalog no longer has."""
    published = publish.latest(storage, model_version)
    previous = features.read_manifest(storage, model_version, published) if published else None
    if previous is None:
        return 0
    gone = pc.invert(pc.is_in(previous.column("product_id"), value_set=manifest.column("product_id")))
    return int(pc.sum(gone).as_py() or 0)


def _unchanged(counts: dict) -> bool:
    """No new features and nobody gone: the published index already says everything.

    Rows rejected again (a URL still dead) do not count as change; they are retried every run.
    """
    return counts["ok"] == 0 and counts["removed"] == 0 and counts["duplicates"] == 0


def run(cfg: Config, run_id: str | None = None) -> dict:
    """Run once; returns the report, or raises RunFailed (the report is written either way)."""
    run_id = run_id or new_run_id()
    storage = Storage.from_config(cfg.storage)
    mv = cfg.embed.model_version
    report = Report(run_id, mv, storage)
    report.observe(metrics.RunMetrics(storage), notify.RunNotifier(cfg))  # dashboard + Slack
    try:
        with report.stage("connect"):
            raycluster.connect(cfg.ray)
            device = raycluster.embed_device(cfg.embed.device)
            check_fits(cfg, raycluster.cpus_available())
            report.data["device"] = device
            base = publish.read_pointer(storage, mv)  # publish succeeds only if LATEST is still this
        with report.stage("plan"):
            known = pa.table({c: pa.array([], pa.string()) for c in plan.STATE_COLUMNS}) if cfg.plan.full \
                else plan.known_features(storage, mv, run_id)
            report.data["known_features"] = known.num_rows
        with report.stage("download_embed_store"), download.throttle(cfg.download) as throttle:
            manifest = _consume(build_dataset(cfg, run_id, device, storage, known, throttle), report, storage, run_id)
            report.data["download"] = download.stats(throttle)
        report.rate("download_embed_store", report.data["counts"]["ok"])
        counts = report.data["counts"]
        counts["removed"] = _removed(storage, mv, manifest)
        counts["indexed"] = manifest.num_rows
        if manifest.num_rows == 0:
            raise RunFailed("no image could be processed; nothing to index (see rejects.parquet)", report.data)
        check_reject_ratio(report.data, cfg.download.max_reject_ratio)
        if not cfg.plan.publish_unchanged and _unchanged(counts):
            report.data["index_version"] = publish.latest(storage, mv)
            report.finish("unchanged")
            return report.data
        features.write_manifest(storage, mv, run_id, manifest)
        with report.stage("index"):
            index.build(storage, mv, run_id, run_id, cfg.index)
        report.data["index_version"] = run_id
        with report.stage("validate"):
            expected = features.counts(storage, mv, run_id)
            result = validate.validate(storage, mv, run_id, cfg.index.validate_, expected=expected)
        report.data["validation"] = result
        if not result["ok"]:
            raise RunFailed("index failed validation, not published: " + "; ".join(result["failures"]),
                            report.data)
        with report.stage("publish"):
            report.data["publish"] = publish.publish(storage, mv, run_id, cfg.storage.keep_versions, expected=base)
        report.data["index_uri"] = storage.uri(*index.version_prefix(mv, run_id))
        report.finish("published")
        return report.data
    except (RunFailed, catalog.CatalogError, publish.PublishConflict) as exc:
        report.finish("failed", error=str(exc))
        raise RunFailed(str(exc), report.data) from None
    except Exception as exc:
        report.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise RunFailed(f"{report.current or 'run'} failed: {type(exc).__name__}: {exc}", report.data) from exc
