"""Hot swap: a watcher follows LATEST, prepares a new version everywhere, then switches at once.

A new version is prepared first: the ingress loads its directory, and every replica of every
searcher group loads and checks its shards beside the version it serves. Only when all succeed
does the ingress switch, with one assignment. A version that fails to load or check anywhere, or
a replica that does not answer in time, is refused: the old one keeps serving.
"""
import logging
import threading
import time

from engine import metrics, publish
from engine.display import Display
from engine.config import Config
from engine.index import Directory, model_mismatch, prune_cache, read_manifest
from engine.storage import Storage
from serve.routing import Routing
from serve.searcher import ShardGroup

log = logging.getLogger("lookalike.serve")
PREPARE_ROUNDS = 8    # rounds of prepare calls before "not every replica answered" refuses a version
PREPARE_HOLD_S = 0.2  # how long a replica holds a prepare call, so the next goes to another replica


class Swapper:
    """Follows LATEST; prepares each new version on the ingress and every searcher group, then switches."""

    def __init__(self, cfg: Config, searchers: list, replicas: int = 1):
        self.cfg, self.searchers, self.replicas = cfg, searchers, replicas
        self.storage = Storage.from_config(cfg.storage)
        self.model_version = cfg.embed.model_version
        self.active: Routing | None = None
        self.latest: str | None = None
        self.preparing: str | None = None
        self.refused: dict[str, tuple[float, str]] = {}
        self.swapped_at: str | None = None
        self.polled = False
        self.replicas_prepared: dict[str, int] = {}
        self._prepared: dict[str, int] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="index-watcher", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive storage hiccups
                log.exception("index refresh failed; keeping %s", self.active and self.active.version)
            self.polled = True
            time.sleep(self.cfg.serve.reload_interval_s)

    def refresh(self) -> bool:
        with self._lock:
            self.latest = version = publish.latest(self.storage, self.model_version)
            if version is None or (self.active is not None and self.active.version == version):
                return False
            refusal = self.refused.get(version)
            if refusal and time.monotonic() - refusal[0] < self.cfg.serve.retry_refused_s:
                return False
            self.preparing = version
            try:
                routing = self._prepare(version)
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version, never the service
                reason = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                self.refused[version] = (time.monotonic(), reason)
                log.error("index %s refused: %s; still serving %s", version, reason,
                          self.active and self.active.version)
                return False
            finally:
                self.preparing = None
            previous, self.active = self.active, routing
            if not self.storage.is_local:  # the cache keeps the version served and the one before
                prune_cache(self.cfg.serve.cache_dir, self.model_version,
                            [routing.manifest] + ([previous.manifest] if previous else []))
            self.swapped_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.replicas_prepared = self._prepared  # per searcher group: replicas that loaded and checked it
            self.refused.pop(version, None)
            log.info("serving index %s (was %s)", version, previous and previous.version)
            metrics.safely(metrics.service().index_swapped, self.model_version, version,
                           previous and previous.version)
            return True

    def _prepare(self, version: str) -> Routing:
        manifest = read_manifest(self.storage, self.model_version, version)
        if manifest["dim"] != self.cfg.embed.dim:
            raise RuntimeError(f"index dim {manifest['dim']} differs from embed.dim {self.cfg.embed.dim}")
        wrong = model_mismatch(manifest, self.cfg.embed)
        if wrong:  # queries would be embedded by another model than the index was built with
            raise RuntimeError("embedding model versions differ (category: index's, config's): " + ", ".join(
                f"{c}: {i}, {m}" for c, (i, m) in sorted(wrong.items())))
        directory = Directory.load(self.storage, manifest, self.cfg.serve.cache_dir, verify=True)
        display = Display.load(self.storage, manifest, self.cfg.serve.cache_dir, verify=True)  # with its version
        answers = [a for g, h in enumerate(self.searchers) for a in self._prepare_group(g, h, version)]
        self._prepared = {str(g): sum(a["group"] == g for a in answers) for g in range(len(self.searchers))}
        bad = [a for a in answers if not a["ok"]]
        if bad:
            raise RuntimeError("; ".join(f"searcher group {a['group']}: {a['error']}" for a in bad))
        return Routing.of(manifest, directory, len(self.searchers), display)

    def _prepare_group(self, group: int, handle, version: str) -> list[dict]:
        """Every replica's answer: calls go out in rounds of ``replicas``, each held briefly so the
        router sends the next to another replica, until each replica has answered (a replica that
        has the version answers at once). No answer in serve.prepare_timeout_s refuses the version."""
        if isinstance(handle, ShardGroup):
            return [handle.prepare_now(version)]
        deadline = time.monotonic() + self.cfg.serve.prepare_timeout_s
        seen: dict[str, dict] = {}
        for _ in range(PREPARE_ROUNDS):
            calls = [handle.prepare.remote(version, PREPARE_HOLD_S) for _ in range(self.replicas)]
            for call in calls:
                left = deadline - time.monotonic()
                try:
                    answer = call.result(timeout_s=max(0.001, left))
                except TimeoutError:
                    raise RuntimeError(f"searcher group {group}: a replica did not prepare {version} within "
                                       f"serve.prepare_timeout_s={self.cfg.serve.prepare_timeout_s:g}s") from None
                seen[answer.get("replica", "?")] = answer
            if len(seen) >= self.replicas:
                return list(seen.values())
        raise RuntimeError(f"searcher group {group}: only {len(seen)} of {self.replicas} replicas answered "
                           f"prepare for {version}")

    def state(self) -> dict:
        """What /healthz and /version report about swapping."""
        out = {"latest": self.latest}
        refusal = self.refused.get(self.latest) if self.latest else None
        if refusal:
            out["refused"] = {"version": self.latest, "reason": refusal[1]}
        if self.preparing:
            out["loading"] = self.preparing
        return out
