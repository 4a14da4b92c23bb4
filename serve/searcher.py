"""Searcher deployments: each holds one group of an index's shards, mmap'd, and answers in threads.

A replica keeps several index versions loaded side by side and answers every request from exactly
the version the request names; that is what lets the ingress switch all searchers at one instant.
New versions are loaded (and checked) beside the old one, ahead of the switch; a version nobody
has asked for since ``serve.swap_grace_s`` is unloaded once it is neither LATEST nor the last one
asked for, and only when no query is using it. A version asked for but not loaded (a restarted
replica, a straggling request) is loaded on demand: slower, never wrong.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from ray import serve

from engine import publish
from engine.api import load_manifest, self_check  # noqa: F401 - the API's loading path: what notebooks open
from engine.config import Config
from engine.index import IndexLoadError, LoadedIndex, Location, prune_cache, read_manifest
from engine.storage import Storage
from serve import filters
from serve.filters import FilterError
from serve.fresh import Fresh

log = logging.getLogger("lookalike.serve")
MASK_CACHE = 64  # filter masks kept per searcher (one bool per item of a shard each)


def both(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """A shard's keep mask from a filter's and the tombstones' (either may be None: all kept)."""
    return b if a is None else a if b is None else a & b


def assign(manifest: dict, groups: int) -> dict[tuple[str, int], int]:
    """(category, shard) -> searcher group: biggest shards first, each onto the least loaded group.

    A pure function of the manifest, so the ingress and every searcher agree without talking.
    """
    shards = sorted(((e["count"], cat, e["shard"]) for cat, entry in manifest["categories"].items()
                     for e in entry["shards"]), key=lambda t: (-t[0], t[1], t[2]))
    load, out = [0] * groups, {}
    for count, cat, number in shards:
        g = min(range(groups), key=lambda i: (load[i], i))
        out[(cat, number)] = g
        load[g] += count
    return out


class VersionStore:
    """The index versions one searcher replica holds, for one group of shards."""

    def __init__(self, storage: Storage, model_version: str, group: int, groups: int, cache_dir: str,
                 grace_s: float, retry_s: float):
        self.storage, self.model_version = storage, model_version
        self.group, self.groups, self.cache_dir = group, groups, cache_dir
        self.grace_s, self.retry_s = grace_s, retry_s
        self.loaded: dict[str, LoadedIndex] = {}
        self.failed: dict[str, tuple[float, str]] = {}
        self.last_used: dict[str, float] = {}
        self.in_flight: dict[str, int] = {}
        self.last_asked: str | None = None
        self.order: list[str] = []  # the last two versions loaded, oldest first: what the cache keeps
        self.manifests: dict[str, dict] = {}
        self._load_lock = threading.Lock()
        self._count_lock = threading.Lock()

    def load(self, version: str) -> LoadedIndex:
        """Load and check this group's shards of ``version`` (once; failures are remembered for retry_s)."""
        found = self.loaded.get(version)
        if found is not None:
            return found
        with self._load_lock:
            if version in self.loaded:
                return self.loaded[version]
            failure = self.failed.get(version)
            if failure and time.monotonic() - failure[0] < self.retry_s:
                raise IndexLoadError(failure[1])
            t0 = time.monotonic()
            try:
                manifest = read_manifest(self.storage, self.model_version, version)
                owned = assign(manifest, self.groups)
                index = load_manifest(self.storage, manifest, self.cache_dir, verify=True,
                                      select=lambda c, s: owned[(c, s)] == self.group)  # + each shard's self-query
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version, never the replica
                reason = str(exc) if isinstance(exc, IndexLoadError) else f"{type(exc).__name__}: {exc}"
                self.failed[version] = (time.monotonic(), reason)
                log.error("searcher %d: index %s refused: %s", self.group, version, reason)
                raise IndexLoadError(reason) from None
            self.failed.pop(version, None)
            self.loaded[version] = index
            self._prune(version)
            self.last_used[version] = time.monotonic()
            log.info("searcher %d: loaded index %s (%d shards) in %.2fs", self.group, version, len(index.shards),
                     time.monotonic() - t0)
            return index

    def _prune(self, version: str) -> None:
        """Keep on local disk only ``version`` and the one loaded before it (for rollback); a version
        still loaded past that keeps working from its mmap, and is fetched again if asked for later."""
        self.order = [v for v in self.order if v != version][-1:] + [version]
        self.manifests = {v: self.manifests.get(v) or self.loaded[v].manifest for v in self.order}
        if not self.storage.is_local:
            prune_cache(self.cache_dir, self.model_version, list(self.manifests.values()))

    def acquire(self, version: str) -> LoadedIndex:
        index = self.load(version)
        with self._count_lock:
            self.in_flight[version] = self.in_flight.get(version, 0) + 1
            self.last_used[version] = time.monotonic()
            self.last_asked = version
        return index

    def release(self, version: str) -> None:
        with self._count_lock:
            self.in_flight[version] -= 1
            self.last_used[version] = time.monotonic()

    def retire(self, latest: str | None) -> list[str]:
        """Unload versions that are idle past the grace period and neither LATEST nor the last asked for."""
        now, dropped = time.monotonic(), []
        with self._load_lock, self._count_lock:
            for version in list(self.loaded):
                if version in (latest, self.last_asked) or self.in_flight.get(version, 0):
                    continue
                if now - self.last_used.get(version, 0) >= self.grace_s:
                    self.loaded.pop(version).close()
                    dropped.append(version)
        for version in dropped:
            log.info("searcher %d: unloaded index %s", self.group, version)
        return dropped


class ShardGroup:
    """One group of shards. Methods take the index version to answer from, and answer from it or fail.

    Runs as a ``Searcher`` deployment, or inside the ingress when ``serve.searcher_groups`` is 0
    (one machine, an index that fits one process: no extra hop per query).
    """

    def __init__(self, cfg: Config, group: int, groups: int):
        self.cfg = cfg
        serve_cfg = self.cfg.serve
        self.group = group
        self.store = VersionStore(Storage.from_config(self.cfg.storage), self.cfg.embed.model_version, group, groups,
                                  serve_cfg.cache_dir, serve_cfg.swap_grace_s, serve_cfg.retry_refused_s)
        self.pool = ThreadPoolExecutor(serve_cfg.searcher_threads, thread_name_prefix=f"annoy-{group}")
        self.latest: str | None = None
        self.masks: OrderedDict = OrderedDict()  # (version, category, shard, filter) -> bool mask
        self.fresh = Fresh(self.store.storage, self.store.model_version, serve_cfg.poll_interval_s)  # tombstones
        self._poll()  # a fresh replica starts warm on LATEST
        self.fresh.start(lambda: [self.latest, self.store.last_asked])
        threading.Thread(target=self._watch, name=f"searcher-{group}-watch", daemon=True).start()

    def _poll(self) -> None:
        try:
            self.latest = publish.latest(self.store.storage, self.store.model_version)
            if self.latest:
                self.store.load(self.latest)
        except IndexLoadError:
            pass  # remembered in store.failed; the ingress sees it when it prepares this version
        except Exception:  # noqa: BLE001 - the watcher must outlive storage hiccups
            log.exception("searcher %d: polling LATEST failed", self.group)
        self.store.retire(self.latest)

    def _watch(self) -> None:
        while True:
            time.sleep(self.cfg.serve.reload_interval_s)
            self._poll()

    async def prepare(self, version: str) -> dict:
        """Load and check ``version`` beside what is served now; says whether it can be switched to."""
        return await asyncio.get_running_loop().run_in_executor(None, self.prepare_now, version)

    def prepare_now(self, version: str) -> dict:
        try:
            index = self.store.load(version)
        except IndexLoadError as exc:
            return {"ok": False, "group": self.group, "version": version, "error": str(exc)}
        self.fresh.refresh(version)  # its tombstones before it is switched to
        return {"ok": True, "group": self.group, "version": version,
                "shards": sorted(f"{c}/{n}" for c, n in index.shards), "items": sum(index.counts().values())}

    @contextlib.asynccontextmanager
    async def _using(self, version: str):
        if version in self.store.loaded:
            index = self.store.acquire(version)
        else:
            index = await asyncio.get_running_loop().run_in_executor(None, self.store.acquire, version)
        try:
            yield index
        finally:
            self.store.release(version)

    async def search(self, version: str, categories: list[str], n: int, vector: list[float] | None = None,
                     location: tuple[str, int, int] | None = None, filter: str | None = None) -> dict:
        """Top-n of every shard of ``categories`` in this group, from ``version`` only.

        With ``location`` (a shard of this group) the query vector is that item's, and is returned
        so the ingress can ask the other groups. With ``filter`` (serve.filters) only matching
        items are answered, still n of them when n match; a filter this version cannot apply
        comes back as ``error`` (the ingress answers 400).
        """
        loop = asyncio.get_running_loop()
        async with self._using(version) as index:
            if location is not None:
                vector = index.vector(Location(*location)).tolist()
            shards = [s for c in categories for s in index.categories.get(c, [])]
            dead = self.fresh.get(version)
            try:
                keeps = [self._keep(version, s, filter) if filter else None for s in shards]
            except FilterError as exc:
                return {"version": version, "group": self.group, "vector": None, "hits": [], "error": str(exc)}
            keeps = [both(keep, dead.mask(s)) for s, keep in zip(shards, keeps)]
            parts = await asyncio.gather(*[loop.run_in_executor(self.pool, partial(s.search, vector, n, keep=keep))
                                           for s, keep in zip(shards, keeps)])
        hits = [(s.category, ids, np.asarray(scores).tolist()) for s, (ids, scores) in zip(shards, parts)]
        return {"version": version, "group": self.group, "vector": vector if location is not None else None,
                "hits": hits}

    def _keep(self, version: str, shard, text: str) -> np.ndarray:
        """The filter's mask over one shard, from a small LRU (a popular filter is one lookup)."""
        key = (version, shard.category, shard.number, text)
        mask = self.masks.get(key)
        if mask is not None:
            self.masks.move_to_end(key)
            return mask
        if shard.attrs is None:
            raise FilterError(f"filter: index version {version} has no filter columns for {shard.category}")
        columns = getattr(shard, "filter_columns", None)
        if columns is None:
            columns = shard.filter_columns = filters.Columns(shard.attrs)
        mask = columns.mask(filters.parse(text, self.cfg.index.filter_columns))
        self.masks[key] = mask
        while len(self.masks) > MASK_CACHE:
            self.masks.popitem(last=False)
        return mask

    def loaded(self) -> dict:
        return {"group": self.group, "loaded": sorted(self.store.loaded), "latest": self.latest,
                "refused": {v: r for v, (_, r) in self.store.failed.items()}}


@serve.deployment(name="Searcher")
class Searcher(ShardGroup):
    def __init__(self, cfg: dict, group: int, groups: int):
        super().__init__(Config.model_validate(cfg), group, groups)

    async def prepare(self, version: str, hold_s: float = 0.0) -> dict:
        """As ShardGroup.prepare, naming this replica; held ``hold_s`` so the swapper reaches every replica."""
        answer = await super().prepare(version)
        await asyncio.sleep(hold_s)
        return {**answer, "replica": serve.get_replica_context().replica_id.unique_id}
