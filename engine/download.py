"""Download stage: catalog rows -> decoded, model-ready pixels, or a reject with a reason.

The reference system once took down its own image server; this stage is polite by
construction, and politeness is a property of the whole run, not of one actor:

- Global request rate. One ``Throttle`` Ray actor per run owns a schedule of send times
  ("slots") spaced exactly ``1 / (max_rps * (1 - HEADROOM))`` apart. Download actors lease a
  few slots at a time, send each request at its slot, and throw a slot away rather than use
  it more than ``LATE_S`` late (a late request would bunch up with the following ones). So no
  one-second window of send times holds more than ``max_rps + 1`` requests, however many actors
  or nodes; the headroom absorbs the scheduling jitter of a busy machine.
- Per-host concurrency: ``per_host_concurrency`` is split evenly across the actors.
- Timeouts for connect, for silence between bytes, and for the whole request.
- Retries of transient failures (timeouts, resets, truncated transfers, 5xx, 429) with
  exponential backoff and jitter, never sooner than Retry-After; 403/404/410 are final.
- A circuit breaker per host: a high error rate pauses the host (doubling pauses, one probe
  request at a time), and a host failing for ``breaker_give_up_s`` has its rows rejected fast.

Every input row leaves as exactly one output row, ``status`` "ok" (with ``pixels`` and a small
JPEG ``thumb``, made from the same decode) or "rejected" (with a stable ``reason`` code and a
``detail``); nothing is dropped.
"""
from __future__ import annotations

import asyncio

import pyarrow as pa

from engine.catalog import CATALOG_FIELDS, normalise
from engine.config import DownloadConfig
from engine.fetch import Fetcher, backoff, check_row, parse_retry_after  # noqa: F401 - the stage's public names
from engine.fetcherror import FetchError, Redirect, ThrottleLost  # noqa: F401
from engine.hostbreaker import Host  # noqa: F401
from engine.ratelimit import (HEADROOM, LATE_S, RateGate, SlotSchedule, Throttle,  # noqa: F401
                              ray_lease, stats, throttle)

RESULT_FIELDS = [pa.field("status", pa.string()), pa.field("reason", pa.string()),
                 pa.field("detail", pa.string()), pa.field("pixels", pa.binary()),
                 pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("thumb", pa.binary())]
# Ray Data tasks (input blocks) running at once on one actor's event loop: a block waiting on
# its slowest row does not idle the actor.
CALLS_PER_ACTOR = 4


# --- the Ray Data stage -----------------------------------------------------------------------

class DownloadStage:
    """Ray Data actor. ``__call__`` is async: Ray Data runs it on one event loop per actor, with
    several batches (and several blocks, CALLS_PER_ACTOR) in flight, so slow rows overlap."""

    def __init__(self, cfg: dict, image_size: int, throttle=None, storage_options: dict | None = None,
                 full_size: int | None = None, max_id_bytes: int = 256):
        self.cfg = DownloadConfig.model_validate(cfg)
        self.size, self.full_size = image_size, full_size
        self.storage_options = storage_options
        self.throttle = throttle
        self.max_id_bytes = max_id_bytes
        self.fetcher: Fetcher | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fetcher is None:
            lease = ray_lease(self.throttle) if self.throttle is not None and self.cfg.max_rps else None
            self.fetcher = Fetcher(self.cfg, lease, self.size, self.storage_options, self.full_size,
                                   max_id_bytes=self.max_id_bytes)
        batch = normalise(batch)
        rows = batch.select(list(CATALOG_FIELDS)).to_pylist()  # only rows to compute: the plan keeps reused ones
        results = await asyncio.gather(*(self.fetcher.process(r) for r in rows))
        if self.throttle is not None:
            counts = self.fetcher.take_counts()
            counts.update(rows=len(rows), ok=sum(r[0] == "ok" for r in results))
            await self.throttle.record.remote(counts)
        if "note" in batch.column_names:
            batch = batch.drop_columns(["note"])
        for i, field in enumerate(RESULT_FIELDS):
            batch = batch.append_column(field, pa.array([r[i] for r in results], field.type))
        return batch


def apply(ds, cfg: DownloadConfig, image_size: int, throttle_actor, storage_options: dict | None = None,
          full_size: int | None = None, max_id_bytes: int = 256):
    """Add the download stage to a Ray Dataset: a fixed pool of ``cfg.actors`` actors, sharing
    ``throttle_actor`` (from ``throttle(cfg)``) for the global rate cap and the run's counters.
    ``full_size``: emit whole images fitted into it (a detect stage follows) instead of model input."""
    from ray.data import ActorPoolStrategy

    if cfg.max_rps and throttle_actor is None:
        raise ValueError("download.max_rps is set but no Throttle actor was given: "
                         "use `with download.throttle(cfg) as t: download.apply(ds, cfg, size, t)`")

    return ds.map_batches(
        DownloadStage, fn_constructor_kwargs={"cfg": cfg.model_dump(), "image_size": image_size,
                                              "throttle": throttle_actor, "storage_options": storage_options,
                                              "full_size": full_size, "max_id_bytes": max_id_bytes},
        batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR),
        num_cpus=cfg.cpus_per_actor)
