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

Every input row leaves as exactly one output row, ``status`` "ok" (with ``pixels``) or
"rejected" (with a stable ``reason`` code and a ``detail``); nothing is dropped.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import math
import random
import re
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from engine import imaging
from engine.catalog import CATALOG_FIELDS, normalise
from engine.config import DownloadConfig

log = logging.getLogger(__name__)

CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.&'+-]{0,63}$")
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
RESULT_FIELDS = [pa.field("status", pa.string()), pa.field("reason", pa.string()),
                 pa.field("detail", pa.string()), pa.field("pixels", pa.binary()),
                 pa.field("width", pa.int32()), pa.field("height", pa.int32())]
LATE_S = 0.03            # a slot used later than this is discarded: see the module docstring
HEADROOM = 0.03          # the schedule runs this much below max_rps: (1 - 0.03) * (1 + 0.03) < 1
LEASE_HORIZON_S = 0.25   # slots are handed out at most this far ahead
LEASE_CHUNK_S = 0.05     # ... and in chunks worth at least this long, to keep lease calls few
MAX_COOLDOWN_DOUBLINGS = 3
# Ray Data tasks (input blocks) running at once on one actor's event loop: a block waiting on
# its slowest row does not idle the actor.
CALLS_PER_ACTOR = 4


class FetchError(Exception):
    """One failed attempt; ``transient`` ones are retried and count against the host's health."""

    def __init__(self, reason: str, detail: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient, self.retry_after = reason, detail, transient, retry_after
        self.probe = False  # a failed circuit-breaker probe: the breaker's cost, not the row's


class Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class ThrottleLost(RuntimeError):
    """The run's Throttle actor is gone: without it no request may be sent, so the batch fails."""


def check_row(row: dict) -> tuple[str, str] | None:
    """A malformed catalog row's (reason, detail), or None when it can be fetched."""
    for name in CATALOG_FIELDS:
        value = row.get(name)
        if value is None or not str(value).strip():
            return "malformed_row", f"{name} is missing or empty"
    if not CATEGORY_NAME.match(str(row["category"])):
        return "malformed_row", f"category {str(row['category'])[:80]!r} is not a usable name"
    scheme = urllib.parse.urlsplit(row["image_url"]).scheme
    if scheme not in ("http", "https", "file", "gs"):
        return "bad_url", f"unsupported URL scheme {scheme!r}"
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so actors that failed
    together do not come back together, and no retry comes back immediately."""
    step = min(cap, base * 2 ** attempt)
    return step / 2 + rng.uniform(0, step / 2)


# --- the global request rate ------------------------------------------------------------------

class SlotSchedule:
    """Send times spaced exactly ``1 / rps`` apart, handed out in order and never twice.

    Capacity not used is not banked: after an idle spell the next slot is "now", so there is
    never a burst.
    """

    def __init__(self, rps: float, horizon_s: float = LEASE_HORIZON_S, chunk_s: float = LEASE_CHUNK_S):
        self.interval = 1.0 / rps
        self.horizon = max(horizon_s, self.interval)
        self.chunk = max(1, math.ceil(rps * chunk_s))
        self.next = 0.0

    def lease(self, n: int, now: float) -> tuple[float, int, float]:
        """Up to ``n`` slots: (first slot time, count, seconds to wait before asking again)."""
        start = max(self.next, now)
        room = math.floor((now + self.horizon - start) / self.interval + 1e-9) + 1
        need = min(n, self.chunk)
        if room < need:
            return start, 0, max(0.001, start + (need - 1) * self.interval - self.horizon - now)
        count = min(n, room)
        self.next = start + count * self.interval
        return start, count, 0.0


class Throttle:
    """The run's one rate authority (a Ray actor, ``num_cpus=0``), and the sum of every download
    actor's counters for the report."""

    def __init__(self, max_rps: float | None):
        import ray

        self.schedule = SlotSchedule(max_rps * (1 - HEADROOM)) if max_rps else None
        self.node = ray.get_runtime_context().get_node_id()
        self.totals: collections.Counter = collections.Counter()

    def lease(self, n: int) -> dict:
        now = time.monotonic()
        start, count, retry_in = self.schedule.lease(n, now)
        return {"start": start, "count": count, "interval": self.schedule.interval, "retry_in": retry_in,
                "now": now, "node": self.node}

    def record(self, counts: dict) -> None:
        self.totals.update(counts)

    def stats(self) -> dict:
        out = dict(self.totals)
        if "throttle_wait_s" in out:
            out["throttle_wait_s"] = round(out["throttle_wait_s"], 3)
        return out


@contextlib.contextmanager
def throttle(cfg: DownloadConfig):
    """The run's Throttle actor, killed when the block ends."""
    import ray

    actor = ray.remote(Throttle).options(num_cpus=0, max_restarts=3, max_task_retries=3).remote(cfg.max_rps)
    try:
        yield actor
    finally:
        ray.kill(actor)


def stats(actor) -> dict:
    """The run's download counters so far: rows, ok, requests, retries, throttle wait, ..."""
    import ray

    return ray.get(actor.stats.remote())


def ray_lease(actor):
    """A lease function over the Throttle actor, in this process's monotonic clock. On the same
    node the clocks are the same clock (CLOCK_MONOTONIC is system-wide); across nodes the
    offset is taken when the answer arrives."""
    import ray

    node = ray.get_runtime_context().get_node_id()

    async def lease(n: int) -> tuple[float, int, float, float]:
        try:
            r = await actor.lease.remote(n)
        except ray.exceptions.RayError as exc:
            raise ThrottleLost(f"the run's Throttle actor is unreachable: {exc}") from exc
        offset = 0.0 if r["node"] == node else time.monotonic() - r["now"]
        return r["start"] + offset, r["count"], r["interval"], r["retry_in"]

    return lease


class RateGate:
    """This actor's side of the global rate: waiters queue, a single task leases slots for them
    in small batches, and each waiter sends at its slot or not at all."""

    def __init__(self, lease, late_s: float = LATE_S):
        self._lease = lease
        self.late_s = late_s
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._leaser: asyncio.Task | None = None
        self.dropped = 0

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            fut = loop.create_future()
            self._waiting.append(fut)
            if self._leaser is None or self._leaser.done():
                self._leaser = loop.create_task(self._lease_loop())
            slot = await fut
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - slot <= self.late_s:
                return
            self.dropped += 1

    def _next_waiter(self) -> asyncio.Future | None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                return fut
        return None

    async def _lease_loop(self) -> None:
        try:
            while True:
                want = sum(1 for f in self._waiting if not f.done())
                if not want:
                    return
                start, count, interval, retry_in = await self._lease(want)
                if not count:
                    await asyncio.sleep(retry_in)
                    continue
                for i in range(count):
                    fut = self._next_waiter()
                    if fut is None:
                        self.dropped += count - i
                        break
                    fut.set_result(start + i * interval)
        except Exception as exc:  # noqa: BLE001 -- every waiter must hear about it
            while (fut := self._next_waiter()) is not None:
                fut.set_exception(exc if isinstance(exc, ThrottleLost) else ThrottleLost(repr(exc)))


# --- one host, as one actor sees it -----------------------------------------------------------

class Host:
    """A host's share of connections, its Retry-After pause and its circuit breaker.

    Closed: requests flow; outcomes go into a window of the last ``breaker_window``. Open: the
    error rate reached ``breaker_error_ratio``; nobody sends until the cooldown ends (5 s,
    doubling while the host keeps failing). Then one probe goes: success closes the breaker,
    failure opens it again. Past ``breaker_give_up_s`` of failing, rows are rejected at once
    (``host_down``) instead of waiting, though a probe still goes after each cooldown.
    """

    def __init__(self, name: str, cfg: DownloadConfig, share: int):
        self.name, self.cfg = name, cfg
        self.gate = asyncio.Semaphore(share)
        self.recent: collections.deque[bool] = collections.deque(maxlen=cfg.breaker_window)
        self.paused_until = 0.0
        self.open_until = 0.0
        self.failing_since: float | None = None
        self.trips = 0
        self.probe: asyncio.Future | None = None
        self.opened = 0

    @property
    def is_open(self) -> bool:
        return self.trips > 0

    def given_up(self, now: float) -> bool:
        return self.failing_since is not None and now - self.failing_since >= self.cfg.breaker_give_up_s

    async def admit(self) -> bool:
        """Wait until a request to this host may go; True when it goes as the breaker's probe."""
        while True:
            now = time.monotonic()
            if self.is_open and now < self.open_until and self.given_up(now):
                raise FetchError("host_down", f"{self.name} has failed for {now - self.failing_since:.0f}s "
                                 f"(download.breaker_give_up_s={self.cfg.breaker_give_up_s:g})")
            wait = max(self.paused_until, self.open_until) - now
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if not self.is_open:
                return False
            if self.probe is None:
                self.probe = asyncio.get_running_loop().create_future()
                return True
            await asyncio.shield(self.probe)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def outcome(self, failed: bool, probe: bool) -> None:
        now = time.monotonic()
        if probe:
            if failed:
                self._open(now)
            else:
                self.trips, self.failing_since = 0, None
                self.recent.clear()
            fut, self.probe = self.probe, None
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if self.is_open:  # answers to requests sent before the breaker opened say nothing new
            return
        self.recent.append(failed)
        errors = sum(self.recent)
        if len(self.recent) >= self.cfg.breaker_min_requests and errors / len(self.recent) >= self.cfg.breaker_error_ratio:
            self._open(now)

    def _open(self, now: float) -> None:
        cooldown = self.cfg.breaker_cooldown_s * 2 ** min(self.trips, MAX_COOLDOWN_DOUBLINGS)
        if self.failing_since is None:
            self.failing_since = now
        self.trips += 1
        self.opened += 1
        self.open_until = now + cooldown
        log.warning("download: circuit open for %s for %.1fs (%d errors in its last %d requests)",
                    self.name, cooldown, sum(self.recent), len(self.recent))


# --- fetching ---------------------------------------------------------------------------------

class Fetcher:
    """All of one actor's fetching: a session, the hosts it talks to, its share of the rate.

    Plain asyncio; the Ray Data actor below wraps it, tests drive it directly.
    """

    def __init__(self, cfg: DownloadConfig, lease=None, image_size: int = 224, storage_options: dict | None = None,
                 full_size: int | None = None):
        self.cfg, self.size, self.full_size = cfg, image_size, full_size
        self.storage_options = storage_options  # GCS endpoint/credentials for gs:// image URLs
        self.rate = RateGate(lease) if lease is not None else None
        self.share = max(1, cfg.per_host_concurrency // cfg.actors)
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.hosts: dict[str, Host] = {}
        self.session = None
        self.decoders = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="decode")
        self.readers = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="read")
        self.counts: collections.Counter = collections.Counter()
        self.rng = random.Random()

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            self.hosts[name] = Host(name, self.cfg, self.share)
        return self.hosts[name]

    async def _session(self):
        import aiohttp

        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=self.cfg.total_timeout_s, sock_connect=self.cfg.connect_timeout_s,
                                            sock_read=self.cfg.read_timeout_s)
            # Idle connections are dropped before a typical server (5 s) would drop them under us.
            connector = aiohttp.TCPConnector(limit=self.cfg.concurrency, limit_per_host=self.share,
                                             keepalive_timeout=3.0)
            self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=True,
                                                 headers={"User-Agent": "lookalike-downloader"})
            # aiohttp silently resends a GET once when a connection drops; that resend would skip
            # the rate limiter and the breaker. Our own retry loop does it instead (aiohttp's
            # test client sets the same flag).
            self.session._retry_connection = False
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        self.decoders.shutdown(wait=False)
        self.readers.shutdown(wait=False)

    def take_counts(self) -> dict:
        out = dict(self.counts)
        out["slots_dropped"] = self.rate.dropped if self.rate else 0
        out["breaker_opened"] = sum(h.opened for h in self.hosts.values())
        self.counts.clear()
        if self.rate:
            self.rate.dropped = 0
        for h in self.hosts.values():
            h.opened = 0
        return {k: v for k, v in out.items() if v}

    async def process(self, row: dict) -> tuple:
        """One catalog row -> (status, reason, detail, pixels, width, height).

        Pixels are the model-ready square, or with ``full_size`` the whole image fitted into
        ``full_size`` (for the detect stage, which cuts its crops from it)."""
        bad = check_row(row)
        if bad:
            return ("rejected", *bad, b"", 0, 0)
        try:
            data = await self.fetch(row["image_url"])
            pixels = await asyncio.get_running_loop().run_in_executor(self.decoders, self._decode, data)
        except (FetchError, imaging.ImageRejected) as exc:
            return ("rejected", exc.reason, exc.detail, b"", 0, 0)
        except ThrottleLost:
            raise
        except Exception as exc:  # noqa: BLE001 -- a bug must not lose the row; the reject ratio shows it
            log.exception("download: unexpected error for %s", row["image_url"])
            return ("rejected", "internal_error", f"{type(exc).__name__}: {exc}"[:300], b"", 0, 0)
        return ("ok", None, None, pixels.tobytes(), pixels.shape[1], pixels.shape[0])

    def _decode(self, data: bytes):
        if self.full_size:
            return imaging.fit(imaging.decode(data, self.cfg.max_pixels), self.full_size)
        return imaging.prepare(data, self.size, self.cfg.max_pixels)

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, after retries and redirects, or the last attempt's FetchError."""
        attempt = hops = 0
        while True:
            try:
                return await self._attempt(url)
            except Redirect as r:
                hops += 1
                if hops > self.cfg.max_redirects:
                    raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects}, last to {r.location}")
                self.counts["redirects"] += 1
                url = r.location
            except FetchError as exc:
                if exc.probe:
                    continue  # the breaker has reopened; the row waits for it in Host.admit
                if not exc.transient or attempt >= self.cfg.retries:
                    raise
                if exc.retry_after is not None and exc.retry_after > self.cfg.max_retry_after_s:
                    raise FetchError(exc.reason, f"{exc.detail}; Retry-After {exc.retry_after:.0f}s is longer than "
                                     f"download.max_retry_after_s={self.cfg.max_retry_after_s:g}") from None
                delay = max(exc.retry_after or 0.0,
                            backoff(attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s, self.rng))
                self.counts["retries"] += 1
                await asyncio.sleep(delay)
                attempt += 1

    async def _attempt(self, url: str) -> bytes:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            async with self.slots:
                return await asyncio.get_running_loop().run_in_executor(self.readers, self._read_file, url)
        host = self.host(f"{parts.scheme}://{parts.netloc}")
        async with host.gate:
            probe = await host.admit()
            failed = True
            try:
                async with self.slots:
                    await self._take_slot()
                    self.counts["requests"] += 1
                    if parts.scheme == "gs":
                        data = await asyncio.get_running_loop().run_in_executor(self.readers, self._read_file, url)
                    else:
                        data = await self._get(url)
                failed = False
                return data
            except Redirect:
                failed = False
                raise
            except FetchError as exc:
                failed = exc.transient
                exc.probe = probe and failed
                if exc.retry_after:
                    host.pause(min(exc.retry_after, self.cfg.max_retry_after_s))
                    self.counts["retry_after_pauses"] += 1
                raise
            finally:
                host.outcome(failed, probe)

    async def _take_slot(self) -> None:
        if self.rate is None:
            return
        t = time.monotonic()
        await self.rate.acquire()
        self.counts["throttle_wait_s"] += time.monotonic() - t

    async def _get(self, url: str) -> bytes:
        import aiohttp

        session = await self._session()
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in REDIRECT_STATUS and resp.headers.get("Location"):
                    raise Redirect(urllib.parse.urljoin(url, resp.headers["Location"]))
                if not 200 <= resp.status < 300:
                    raise FetchError(f"http_{resp.status}", f"{resp.status} {resp.reason or ''}".strip(),
                                     transient=resp.status in TRANSIENT_STATUS,
                                     retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                declared = resp.content_length
                if declared is not None and declared > self.cfg.max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} > download.max_bytes={self.cfg.max_bytes}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > self.cfg.max_bytes:
                        raise FetchError("too_large", f"body passed download.max_bytes={self.cfg.max_bytes}")
                return bytes(body)
        except (FetchError, Redirect):
            raise
        except asyncio.TimeoutError as exc:
            what = {aiohttp.ConnectionTimeoutError: f"no connection within {self.cfg.connect_timeout_s:g}s",
                    aiohttp.SocketTimeoutError: f"no bytes for {self.cfg.read_timeout_s:g}s"}.get(
                type(exc), f"not complete within {self.cfg.total_timeout_s:g}s")
            raise FetchError("timeout", what, transient=True) from None
        except aiohttp.ClientPayloadError as exc:
            raise FetchError("truncated", f"transfer cut short: {exc}"[:200], transient=True) from None
        except aiohttp.InvalidURL as exc:
            raise FetchError("bad_url", f"{exc}"[:200]) from None
        except aiohttp.ClientError as exc:
            raise FetchError("connection_error", f"{type(exc).__name__}: {exc}"[:200], transient=True) from None

    def _read_file(self, url: str) -> bytes:
        from engine.storage import fs_for

        try:
            fs, path = fs_for(url, self.storage_options)
            size = fs.size(path)
            if size is not None and size > self.cfg.max_bytes:
                raise FetchError("too_large", f"{size} bytes > download.max_bytes={self.cfg.max_bytes}")
            with fs.open(path, "rb") as f:
                return f.read(self.cfg.max_bytes + 1)
        except FetchError:
            raise
        except FileNotFoundError:
            raise FetchError("not_found", f"no such file: {url}") from None
        except (IsADirectoryError, PermissionError, OSError) as exc:
            raise FetchError("read_error", f"{type(exc).__name__}: {exc}"[:200]) from None


# --- the Ray Data stage -----------------------------------------------------------------------

REUSE, DUPLICATE = "reuse", "duplicate"  # engine.plan's (not imported: plan imports the feature store)
PLANNED = (REUSE, DUPLICATE)  # rows the plan settled: nothing to fetch


async def _planned(action: str, note: str | None) -> tuple:
    """Rows the plan settled: reused features (nothing to fetch) or a duplicate product_id."""
    if action == DUPLICATE:
        return ("rejected", "duplicate_product_id", note, b"", 0, 0)
    return ("reused", None, None, b"", 0, 0)


class DownloadStage:
    """Ray Data actor. ``__call__`` is async: Ray Data runs it on one event loop per actor, with
    several batches (and several blocks, CALLS_PER_ACTOR) in flight, so slow rows overlap."""

    def __init__(self, cfg: dict, image_size: int, throttle=None, storage_options: dict | None = None,
                 full_size: int | None = None):
        self.cfg = DownloadConfig.model_validate(cfg)
        self.size, self.full_size = image_size, full_size
        self.storage_options = storage_options
        self.throttle = throttle
        self.fetcher: Fetcher | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fetcher is None:
            lease = ray_lease(self.throttle) if self.throttle is not None and self.cfg.max_rps else None
            self.fetcher = Fetcher(self.cfg, lease, self.size, self.storage_options, self.full_size)
        batch = normalise(batch)
        rows = batch.select(list(CATALOG_FIELDS)).to_pylist()
        # rows the run plan reuses (engine.plan) keep their stored features: nothing to fetch
        actions = batch.column("action").to_pylist() if "action" in batch.column_names else [None] * len(rows)
        notes = batch.column("note").to_pylist() if "note" in batch.column_names else [None] * len(rows)
        results = await asyncio.gather(*(_planned(a, n) if a in PLANNED else self.fetcher.process(r)
                                         for r, a, n in zip(rows, actions, notes)))
        if self.throttle is not None:
            counts = self.fetcher.take_counts()
            counts.update(rows=sum(a not in PLANNED for a in actions), ok=sum(r[0] == "ok" for r in results))
            await self.throttle.record.remote(counts)
        if "note" in batch.column_names:
            batch = batch.drop_columns(["note"])
        for i, field in enumerate(RESULT_FIELDS):
            batch = batch.append_column(field, pa.array([r[i] for r in results], field.type))
        return batch


def apply(ds, cfg: DownloadConfig, image_size: int, throttle_actor, storage_options: dict | None = None,
          full_size: int | None = None):
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
                                              "full_size": full_size},
        batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR),
        num_cpus=cfg.cpus_per_actor)
