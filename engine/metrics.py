"""Prometheus metrics through ``ray.util.metrics``: the Ray dashboard's Metrics tab (and any
Prometheus scraping the nodes' metrics export port) shows them beside Ray's own.

Ray prefixes every name with ``ray_`` and counters get ``_total``: ``lookalike_rows`` is scraped
as ``ray_lookalike_rows_total``. Recording never raises into the caller, and is skipped when
the process is not connected to Ray (a unit test building an index by hand, say).

Pipeline (driver, while the run goes): rows by outcome, rejects by reason, rows/s of the stage
running now and items/s of each finished stage, stage seconds, index size per category.
Service (every SearchAPI replica): request latency histogram per route, and which index
version each replica serves (1 for the version in service, 0 for the one it replaced).

A batch run's cluster is deleted minutes after it ends, before Prometheus has scraped it for the
last time, so ``RunPush`` also pushes the finished run's numbers to a Pushgateway
(``notify.pushgateway_url``), grouped by job and model version: the group holds the last run.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def _ray_ready() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


# Metric objects per process, made once (Ray's recommendation; a series per object otherwise).
_MADE: dict[str, dict] = {}
# Ray stops exporting a gauge some seconds after it was last set and the agent then drops the
# series, so a run's final numbers (index size, stage seconds) and the version a replica serves
# would vanish from the dashboard while the process still lives: held gauges are set again every
# HOLD_EVERY_S. (name, tags) -> (gauge, value, tags); bounded by what callers hold (see release).
HOLD_EVERY_S = 5.0
_held: dict[tuple, tuple] = {}
_held_lock = threading.Lock()
_keeper: threading.Thread | None = None


def _keep() -> None:
    while True:
        time.sleep(HOLD_EVERY_S)
        if not _ray_ready():
            continue
        with _held_lock:
            held = list(_held.values())
        for gauge, value, tags in held:
            try:
                gauge.set(value, tags=tags)
            except Exception:  # noqa: BLE001 - a metrics hiccup never stops the keeper
                log.debug("metrics: holding %s failed", gauge, exc_info=True)


def hold(gauge, name: str, value: float, tags: dict) -> None:
    """``gauge.set(value, tags)`` now and every HOLD_EVERY_S after, until ``release``d or replaced."""
    global _keeper
    gauge.set(value, tags=tags)
    with _held_lock:
        _held[(name, tuple(sorted(tags.items())))] = (gauge, value, tags)
        if _keeper is None:
            _keeper = threading.Thread(target=_keep, name="lookalike-metrics-hold", daemon=True)
            _keeper.start()


def release(name: str, keep=lambda tags: False) -> None:
    """Stop holding ``name``'s series except those whose tags ``keep`` accepts."""
    with _held_lock:
        for key in [k for k in _held if k[0] == name and not keep(dict(k[1]))]:
            del _held[key]


class _Metrics:
    """Creates its metric objects on first use, inside a process already connected to Ray."""

    def _make(self) -> dict:
        raise NotImplementedError

    def m(self) -> dict | None:
        kind = type(self).__name__
        if kind not in _MADE and _ray_ready():
            _MADE[kind] = self._make()
        return _MADE.get(kind)


class RunMetrics(_Metrics):
    """A Report observer (engine.report): metrics for one pipeline run."""

    def __init__(self, root):
        self.root = root
        self.seen: dict[tuple[str, str], int] = {}
        self.stage: str | None = None
        self.stage_t0 = 0.0
        self.stage_rows0 = 0

    def _make(self) -> dict:
        from ray.util.metrics import Counter, Gauge

        mv = ("model_version",)
        return {
            "rows": Counter("lookalike_rows", "catalog rows by outcome (ok, rejected, ...)", mv + ("outcome",)),
            "rejects": Counter("lookalike_rejects", "rejected rows by reason", mv + ("reason",)),
            "live": Gauge("lookalike_stage_rows_per_second", "rows/s of the running stage, since it began",
                          mv + ("stage",)),
            "rate": Gauge("lookalike_stage_items_per_second", "items/s of a finished stage", mv + ("stage",)),
            "seconds": Gauge("lookalike_stage_seconds", "wall seconds of the last run's stages", mv + ("stage",)),
            "items": Gauge("lookalike_index_items", "items in the published index, per category",
                           mv + ("category",)),
            "bytes": Gauge("lookalike_index_bytes", "bytes of Annoy files in the published index, per category",
                           mv + ("category",)),
            "runs": Counter("lookalike_runs", "finished runs by status", mv + ("status",)),
            "finished": Gauge("lookalike_run_finished_timestamp_seconds", "when the last run finished, by status",
                              mv + ("status",)),
        }

    def on_start(self, data: dict) -> None:
        self.mv = data["model_version"]

    def on_stage_start(self, name: str) -> None:
        self.stage, self.stage_t0 = name, time.monotonic()
        self.stage_rows0 = sum(v for (kind, _), v in self.seen.items() if kind == "rows")

    def on_progress(self, data: dict) -> None:
        m = self.m()
        if m is None:
            return
        tags = {"model_version": self.mv}
        for outcome, n in data["counts"].items():
            if outcome != "rows_in":
                self._inc(m["rows"], "rows", outcome, n, {**tags, "outcome": outcome})
        for reason, n in data["rejects_by_reason"].items():
            self._inc(m["rejects"], "rejects", reason, n, {**tags, "reason": str(reason)})
        if self.stage:
            elapsed = time.monotonic() - self.stage_t0
            rows = data["counts"]["rows_in"] - self.stage_rows0
            if elapsed > 0:
                m["live"].set(rows / elapsed, tags={**tags, "stage": self.stage})

    def _inc(self, counter, kind: str, key: str, total: int, tags: dict) -> None:
        """Counters get the increase since the last batch: the report holds running totals."""
        delta = total - self.seen.get((kind, key), 0)
        if delta > 0:
            counter.inc(delta, tags=tags)
            self.seen[(kind, key)] = total

    def on_stage_end(self, name: str, seconds: float) -> None:
        m = self.m()
        if m is not None:
            hold(m["seconds"], "seconds", seconds, {"model_version": self.mv, "stage": name})
        self.stage = None

    def on_finish(self, data: dict) -> None:
        m = self.m()
        if m is None:
            return
        tags = {"model_version": self.mv}
        for name, s in data.get("stages", {}).items():
            if s.get("items_per_s") is not None:
                hold(m["rate"], "rate", s["items_per_s"], {**tags, "stage": name})
        m["runs"].inc(1, tags={**tags, "status": data["status"]})
        hold(m["finished"], "finished", time.time(), {**tags, "status": data["status"]})
        if data["status"] == "published" and data.get("index_version"):
            sizes = index_sizes(self.root, self.mv, data["index_version"])
            for name in ("items", "bytes"):  # a category the new version no longer has stops being shown
                release(name, lambda t: t["model_version"] != self.mv or t["category"] in sizes)
            for category, (items, size) in sizes.items():
                hold(m["items"], "items", items, {**tags, "category": category})
                hold(m["bytes"], "bytes", size, {**tags, "category": category})


SUCCESS = ("published", "unchanged")


class RunPush:
    """A Report observer: on finish, the run's final numbers to a Prometheus Pushgateway."""

    def __init__(self, cfg):
        self.url = cfg.notify.pushgateway_url
        self.job = cfg.notify.pushgateway_job
        self.timeout_s = cfg.notify.timeout_s

    def on_finish(self, data: dict) -> None:
        if not self.url:
            return
        from prometheus_client import push_to_gateway

        push_to_gateway(self.url, job=self.job, registry=run_registry(data),
                        grouping_key={"model_version": data["model_version"]}, timeout=self.timeout_s)
        log.info("run metrics pushed to %s (job %s)", self.url, self.job)


def run_registry(data: dict):
    """The finished run as Prometheus gauges (names: lookalike_run_*), in a registry of its own."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()

    def gauge(name, doc, labels=()):
        return Gauge(f"lookalike_run_{name}", doc, labels, registry=reg)

    rows = gauge("rows", "catalog rows of the last run by outcome", ("outcome",))
    for outcome, n in data["counts"].items():
        rows.labels(outcome).set(n)
    rejects = gauge("rejects", "rejected rows of the last run by reason", ("reason",))
    for reason, n in data.get("rejects_by_reason", {}).items():
        rejects.labels(str(reason)).set(n)
    seconds = gauge("stage_seconds", "wall seconds of each stage of the last run", ("stage",))
    rate = gauge("stage_items_per_second", "items/s of each stage of the last run", ("stage",))
    for name, st in data.get("stages", {}).items():
        seconds.labels(name).set(st["seconds"])
        if st.get("items_per_s") is not None:
            rate.labels(name).set(st["items_per_s"])
    projected = gauge("projected_seconds", "projected time for the whole catalog at the configured actors",
                      ("stage",))
    for name, st in (data.get("projection") or {}).get("stages", {}).items():
        if st.get("projected_s") is not None:
            projected.labels(name).set(st["projected_s"])
    gauge("success", "1 if the last run published (or had nothing new), 0 if it failed").set(
        int(data["status"] in SUCCESS))
    gauge("status", "1 for the last run's status", ("status",)).labels(data["status"]).set(1)
    gauge("elapsed_seconds", "wall seconds of the last run").set(data.get("elapsed_s", 0))
    gauge("finished_timestamp_seconds", "when the last run finished").set(time.time())
    gauge("info", "1, labelled with the last run's ids", ("run_id", "index_version")).labels(
        data["run_id"], str(data.get("index_version") or "")).set(1)
    return reg


def index_sizes(root, model_version: str, index_version: str) -> dict[str, tuple[int, int]]:
    """category -> (items, bytes of .ann files), from the version's manifest."""
    from engine import index
    from engine.storage import Storage

    manifest = Storage.of(root).read_json(*index.version_prefix(model_version, index_version), index.MANIFEST)
    out = {}
    for category, entry in manifest["categories"].items():
        shards = entry.get("shards", [])
        out[category] = (int(entry.get("count", sum(s.get("count", 0) for s in shards))),
                         int(sum(s.get("bytes", 0) for s in shards)))
    return out


class ServiceMetrics(_Metrics):
    """Latency and index version of one search replica."""

    ROUTES = ("similar", "search", "healthz", "version")

    def _make(self) -> dict:
        from ray.util.metrics import Gauge, Histogram

        return {
            "latency": Histogram("lookalike_search_latency_seconds", "request latency in the SearchAPI replica",
                                 LATENCY_BOUNDARIES_S, ("route", "status")),
            "version": Gauge("lookalike_index_version_info", "1 for the index version this replica serves",
                             ("model_version", "index_version")),
            "loaded": Gauge("lookalike_index_loaded_timestamp_seconds", "when this replica swapped in its index",
                            ("model_version",)),
        }

    def request(self, path: str, status: int, seconds: float) -> None:
        m = self.m()
        if m is None:
            return
        first = path.strip("/").split("/", 1)[0]
        route = first if first in self.ROUTES else "other"
        m["latency"].observe(seconds, tags={"route": route, "status": f"{status // 100}xx"})

    def index_swapped(self, model_version: str, version: str, previous: str | None) -> None:
        m = self.m()
        if m is None:
            return
        release("version", lambda t: t["model_version"] != model_version)  # one swap's pair per line
        if previous and previous != version:
            hold(m["version"], "version", 0, {"model_version": model_version, "index_version": previous})
        hold(m["version"], "version", 1, {"model_version": model_version, "index_version": version})
        hold(m["loaded"], "loaded", time.time(), {"model_version": model_version})


class LatencyMiddleware:
    """Plain ASGI middleware timing each HTTP request (cheaper than Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            safely(service().request, scope.get("path", ""), status[0], time.perf_counter() - t0)


_service: ServiceMetrics | None = None


def service() -> ServiceMetrics:
    global _service
    if _service is None:
        _service = ServiceMetrics()
    return _service


def safely(fn, *args) -> None:
    """For hooks in request paths: a metrics hiccup must not become a 500."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        log.warning("metrics: %s failed", getattr(fn, "__name__", fn), exc_info=True)
