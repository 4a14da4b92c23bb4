"""A small work set computed in one Ray task: the stream's stages (download, detect, embed,
write) called one after another on the same rows, in the same worker.

A 1%-change day has a few dozen rows to compute. As a Ray Data stream they would start the
executor and one actor pool per stage, each loading its model, for seconds of work. Here the
models load once and the rows go through in ``download.batch_size`` batches. The outcome rows
are the stream's (engine.features.write_batch), so the run counts and commits them the same
way; the task also reports where its seconds went.
"""
from __future__ import annotations

import asyncio
import time

import pyarrow as pa

from engine import features
from engine.config import Config
from engine.detect import DetectStage
from engine.download import DownloadStage
from engine.embed import EmbedStage


def resources(cfg: Config, device: str) -> dict:
    """What the task holds: the CPUs of one download, detect and embed actor, and their GPU
    shares (one GPU at most) on a GPU cluster."""
    detecting = cfg.detect.in_pipeline
    cpus = cfg.download.cpus_per_actor + cfg.embed.cpus_per_actor + (cfg.detect.cpus_per_actor if detecting else 0)
    gpus = cfg.embed.gpus_per_actor + (cfg.detect.gpus_per_actor if detecting else 0) if device == "cuda" else 0
    return {"num_cpus": cpus, "num_gpus": min(1.0, gpus)}


def submit(cfg: Config, run_id: str, device: str, storage, work: list, detect_version: str, throttle=None):
    """(outcomes, stats) refs of the task over ``work`` (refs of plan work tables)."""
    import ray

    task = ray.remote(compute).options(num_returns=2, name=f"compute:{run_id}", **resources(cfg, device))
    return task.remote(cfg, run_id, device, storage, detect_version, throttle, *work)


def compute(cfg: Config, run_id: str, device: str, storage, detect_version: str, throttle, *work: pa.Table):
    """Ray task: every work row's outcome (one table) and per stage its seconds and input rows
    ("load": the models)."""
    t0 = time.monotonic()
    gcs = storage.options
    detecting = cfg.detect.in_pipeline
    fetch = DownloadStage(cfg.download.model_dump(), cfg.embed.image_size, throttle, storage_options=gcs,
                          full_size=cfg.detect.image_size if detecting else None,
                          max_id_bytes=cfg.catalog.max_id_bytes)
    detect = DetectStage(cfg.detect.model_dump(), cfg.embed.image_size, device, gcs) if detecting else None
    embed = EmbedStage(cfg.embed.model_dump(), device, gcs)
    versions = {"": cfg.embed.model_version, **{c: m.model_version for c, m in cfg.embed.categories.items()}}
    seconds = {"load": time.monotonic() - t0, "download": 0.0, "detect": 0.0, "embed": 0.0, "store": 0.0}
    rows_in = {"download": 0, "detect": 0, "embed": 0, "store": 0}

    def timed(stage: str, fn, table: pa.Table) -> pa.Table:
        t = time.monotonic()
        out = fn(table)
        seconds[stage] += time.monotonic() - t
        rows_in[stage] += table.num_rows
        return out

    def write(pending: list) -> pa.Table:
        batch = pa.concat_tables(pending, promote_options="default")
        return timed("store", lambda b: features.write_batch(b, storage, versions, detect_version, run_id), batch)

    async def run() -> list:
        outcomes, pending, rows = [], [], 0
        for table in work:
            for at in range(0, table.num_rows, cfg.download.batch_size):
                t = time.monotonic()
                batch = await fetch(table.slice(at, cfg.download.batch_size))
                seconds["download"] += time.monotonic() - t
                rows_in["download"] += batch.num_rows
                if detect is not None:
                    batch = timed("detect", detect, batch)
                batch = pa.concat_tables([timed("embed", embed, batch.slice(i, cfg.embed.batch_size))
                                          for i in range(0, batch.num_rows, cfg.embed.batch_size)] or [batch])
                pending.append(batch)
                rows += batch.num_rows
                if rows >= cfg.storage.feature_batch_rows:
                    outcomes.append(write(pending))
                    pending, rows = [], 0
        if pending:
            outcomes.append(write(pending))
        return outcomes

    outcomes = asyncio.run(run())
    stats = {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "rows": rows_in}
    return (pa.concat_tables(outcomes, promote_options="default") if outcomes else None), stats
