"""One pipeline run: source -> download -> embed -> store -> index -> validate -> publish.

The streaming part is one Ray Data plan (progress bars per operator); the driver only sees
small outcome rows. The run ends with ``runs/<run_id>/report.json`` whatever happens, and
returns normally only when an index was validated and published.
"""
from __future__ import annotations

import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import catalog, features, index, publish, raycluster, validate
from engine.config import Config
from engine.download import DownloadStage
from engine.embed import EmbedStage
from engine.report import Report
from engine.storage import Storage

log = logging.getLogger(__name__)


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


def build_dataset(cfg: Config, run_id: str, device: str, storage: Storage):
    """The streaming plan; nothing runs until it is iterated."""
    from ray.data import ActorPoolStrategy

    gpu = device == "cuda"
    gcs = storage.options  # workers get GCS settings from here, never from the driver's environment
    ds = catalog.read(cfg.source, storage_options=gcs)
    ds = ds.map_batches(
        DownloadStage, fn_constructor_kwargs={"cfg": cfg.download.model_dump(), "image_size": cfg.embed.image_size,
                                              "storage_options": gcs},
        batch_format="pyarrow", batch_size=cfg.download.batch_size,
        compute=ActorPoolStrategy(size=cfg.download.actors), num_cpus=cfg.download.cpus_per_actor)
    ds = ds.map_batches(
        EmbedStage, fn_constructor_kwargs={"cfg": cfg.embed.model_dump(), "device": device, "storage_options": gcs},
        batch_format="pyarrow", batch_size=cfg.embed.batch_size,
        compute=ActorPoolStrategy(size=cfg.embed.actors),
        num_cpus=cfg.embed.cpus_per_actor, num_gpus=cfg.embed.gpus_per_actor if gpu else 0)
    return ds.map_batches(
        features.write_batch, fn_kwargs={"root": storage, "model_version": cfg.embed.model_version,
                                         "run_id": run_id},
        batch_format="pyarrow", batch_size=cfg.storage.feature_batch_rows, num_cpus=0.25)


def _consume(ds, report: Report, storage: Storage, run_id: str) -> None:
    rejects = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        report.count_outcomes(batch)
        bad = batch.filter(pc.equal(batch.column("status"), "rejected"))
        if bad.num_rows:
            rejects.append(bad.select(["product_id", "image_url", "category", "reason", "detail"]))
    table = pa.concat_tables(rejects) if rejects else pa.table(
        {c: pa.array([], pa.string()) for c in ("product_id", "image_url", "category", "reason", "detail")})
    storage.makedirs("runs", run_id)
    pq.write_table(table, storage.path("runs", run_id, "rejects.parquet"), filesystem=storage.fs)


def run(cfg: Config, run_id: str | None = None) -> dict:
    """Run once; returns the report, or raises RunFailed (the report is written either way)."""
    run_id = run_id or new_run_id()
    storage = Storage.from_config(cfg.storage)
    mv = cfg.embed.model_version
    report = Report(run_id, mv, storage)
    try:
        with report.stage("connect"):
            raycluster.connect(cfg.ray)
            device = raycluster.embed_device(cfg.embed.device)
            check_fits(cfg, raycluster.cpus_available())
            report.data["device"] = device
            base = publish.read_pointer(storage, mv)  # publish succeeds only if LATEST is still this
        with report.stage("download_embed_store"):
            _consume(build_dataset(cfg, run_id, device, storage), report, storage, run_id)
        report.rate("download_embed_store", report.data["counts"]["ok"])
        if report.data["counts"]["ok"] == 0:
            raise RunFailed("no image could be processed; nothing to index (see rejects.parquet)", report.data)
        with report.stage("index"):
            index.build(storage, mv, run_id, run_id, cfg.index)
        report.data["index_version"] = run_id
        with report.stage("validate"):
            expected = report.data["categories"]
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
