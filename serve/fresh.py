"""Tombstones as a replica applies them: per index version, a keep mask per shard it holds.

``Fresh`` lists each version's tombstone folder (engine/tombstones.py) at most every
``serve.poll_interval_s`` and turns new files into a ``Dead`` view: a dict for single-id checks
(``/similar`` of a deleted product is a 404) and, per shard, a bool mask over its item positions
(False: deleted, or an older vector of a product that an update re-embedded). Shard.search
over-fetches through that mask, so an answer still has k results when k remain. No Annoy file is
reloaded: masks are numpy arrays beside the mmap'd shards.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import tombstones
from engine.index import generation
from engine.storage import Storage

log = logging.getLogger("lookalike.serve")


def keep_mask(*masks: np.ndarray | None) -> np.ndarray | None:
    """The AND of the masks given (tombstones, a filter's matches); None when none restricts."""
    found = [m for m in masks if m is not None]
    if not found:
        return None
    out = found[0]
    for m in found[1:]:
        out = out & m
    return out


class Dead:
    """One version's tombstones, immutable (a refresh builds a new one)."""

    def __init__(self, files: tuple[str, ...], table: pa.Table):
        self.files = files
        self.ids = table.column("product_id").combine_chunks() if table.num_rows else pa.array([], pa.string())
        self.before = table.column("before").to_numpy() if table.num_rows else np.zeros(0, np.int32)
        self.by_id = dict(zip(self.ids.to_pylist(), self.before.tolist()))
        self._masks: dict = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def alive(self, product_id: str, gen: int) -> bool:
        """Whether a product's vector in a shard of generation ``gen`` may be answered with."""
        return self.by_id.get(product_id, -1) <= gen

    def mask(self, shard) -> np.ndarray | None:
        """Keep mask over ``shard``'s items (engine.index.Shard); None when nothing in it is dead."""
        if not self.by_id:
            return None
        key = id(shard)
        if key not in self._masks:
            at = pc.index_in(shard.ids, value_set=self.ids)
            pos = np.flatnonzero(pc.is_valid(at).to_numpy(zero_copy_only=False))
            mask = None
            if len(pos):
                before = self.before[pc.take(at, pa.array(pos)).to_numpy(zero_copy_only=False).astype(np.int64)]
                dead = pos[before > generation(shard.entry)]
                if len(dead):
                    mask = np.ones(len(shard), bool)
                    mask[dead] = False
            self._masks[key] = (shard, mask)  # the shard is held so its id() cannot be reused
        return self._masks[key][1]


EMPTY = Dead((), tombstones.SCHEMA.empty_table())


class Fresh:
    """The tombstones of the versions one replica serves, kept current by ``poll``."""

    def __init__(self, storage: Storage, model_version: str, interval_s: float):
        self.storage, self.model_version, self.interval_s = storage, model_version, interval_s
        self.views: dict[str, Dead] = {}
        self.polled: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, version: str) -> Dead:
        """The version's tombstones as last polled (read now the first time it is asked for)."""
        view = self.views.get(version)
        return view if view is not None else self.refresh(version)

    def refresh(self, version: str) -> Dead:
        """Read the version's tombstone files again if the folder lists new ones."""
        with self._lock:
            old = self.views.get(version, EMPTY)
            try:
                files = tuple(tombstones.names(self.storage, self.model_version, version))
                if files != old.files:
                    table = tombstones.read(self.storage, self.model_version, version, only=list(files))
                    old = Dead(files, table)
                    log.info("index %s: %d tombstones (%d files)", version, len(old), len(files))
            except Exception:  # noqa: BLE001 - a storage hiccup keeps the last view
                log.exception("index %s: reading tombstones failed; keeping %d", version, len(old))
            self.views[version] = old
            self.polled[version] = time.monotonic()
            return old

    def poll(self, versions) -> None:
        """Refresh the given versions (those served); forget the others."""
        versions = [v for v in dict.fromkeys(versions) if v]
        for v in versions:
            self.refresh(v)
        with self._lock:
            for v in list(self.views):
                if v not in versions:
                    self.views.pop(v, None)

    def start(self, served) -> None:
        """A daemon thread polling ``served()`` (the versions to keep current) every interval."""
        def loop():
            while True:
                time.sleep(self.interval_s)
                try:
                    self.poll(served())
                except Exception:  # noqa: BLE001 - the poller must outlive anything
                    log.exception("tombstone poll failed")
        threading.Thread(target=loop, name="tombstone-poll", daemon=True).start()


def generations(manifest: dict) -> dict[tuple[str, int], int]:
    """(category, shard) -> delta generation, for checking a product's location against tombstones."""
    return {(c, e["shard"]): generation(e) for c, entry in manifest["categories"].items() for e in entry["shards"]}


def live(found: list, dead: Dead, manifest: dict, product_id: str) -> list:
    """The locations (engine.index.Location) of a product whose vector is not tombstoned."""
    if product_id not in dead.by_id:
        return found
    gens = generations(manifest)
    return [f for f in found if dead.alive(product_id, gens.get((f.category, f.shard), 0))]
