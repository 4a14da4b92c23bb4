"""Fetching one URL: retries with backoff, redirects, the per-host breaker, the global rate, timeouts,
size caps, and the address and scheme policy of engine/urlpolicy.py on every hop.

Plain asyncio; the Ray Data stage (engine/download.py) wraps it, tests drive it directly.
"""
from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import random
import re
import time
import unicodedata
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from engine import imaging, urlpolicy
from engine.catalog import CATALOG_FIELDS
from engine.config import CATEGORY, DownloadConfig
from engine.fetcherror import FetchError, Redirect, ThrottleLost
from engine.hostbreaker import Host
from engine.ratelimit import RateGate

log = logging.getLogger("engine.download")

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
CATEGORY_NAME = re.compile(CATEGORY)


def check_row(row: dict, max_id_bytes: int = 256) -> tuple[str, str] | None:
    """A malformed catalog row's (reason, detail), or None when it can be fetched."""
    for name in CATALOG_FIELDS:
        value = row.get(name)
        if value is None or not str(value).strip():
            return "malformed_row", f"{name} is missing or empty"
    bad_id = check_product_id(str(row["product_id"]), max_id_bytes)
    if bad_id:
        return "bad_product_id", bad_id
    if not CATEGORY_NAME.match(str(row["category"])):
        return "malformed_row", f"category {str(row['category'])[:80]!r} is not a usable name"
    scheme = urllib.parse.urlsplit(row["image_url"]).scheme
    if scheme not in urlpolicy.KNOWN_SCHEMES:
        return "bad_url", f"unsupported URL scheme {scheme[:20]!r}"
    return None


def check_product_id(pid: str, max_bytes: int) -> str | None:
    """Why a product id cannot be stored and served (too long, control characters), or None.
    Any other text is fine: "/", "%", "?" and non-ASCII are reachable through percent-encoding."""
    size = len(pid.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return f"product_id is {size} bytes; catalog.max_id_bytes={max_bytes}"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in pid):
        return f"product_id {pid[:40]!r} contains control characters"
    if pid != pid.strip():
        return f"product_id {pid[:40]!r} has leading or trailing whitespace"
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


class Fetcher:
    """All of one actor's fetching: a session, the hosts it talks to, its share of the rate.

    Plain asyncio; the Ray Data actor below wraps it, tests drive it directly.
    """

    def __init__(self, cfg: DownloadConfig, lease=None, image_size: int = 224, storage_options: dict | None = None,
                 full_size: int | None = None, resolver=None,
                 max_id_bytes: int = 256):
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
        self.policy = urlpolicy.Policy(cfg)
        self.max_id_bytes = max_id_bytes
        self.resolver = resolver  # what resolves names before the policy filters them (tests: their own DNS)
        self.opt_out = {t.lower() for t in cfg.opt_out_tags}

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
            # Every address connected to comes through the policy's resolver (engine/urlpolicy.py).
            connector = aiohttp.TCPConnector(limit=self.cfg.concurrency, limit_per_host=self.share,
                                             keepalive_timeout=3.0, resolver=self.policy.resolver(self.resolver))
            self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=True,
                                                 headers={"User-Agent": self.cfg.user_agent}, trust_env=False)
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
        """One catalog row -> (status, reason, detail, pixels, width, height, thumb).

        Pixels are the model-ready square, or with ``full_size`` the whole image fitted into
        ``full_size`` (for the detect stage, which cuts its crops from it); ``thumb`` a small
        JPEG of the image (``download.thumbnail_size``; empty when 0)."""
        bad = check_row(row, self.max_id_bytes)
        if bad:
            return ("rejected", *bad, b"", 0, 0, b"")
        try:
            data = await self.fetch(row["image_url"])
            pixels, thumb = await asyncio.get_running_loop().run_in_executor(self.decoders, self._decode, data)
        except (FetchError, imaging.ImageRejected) as exc:
            return ("rejected", exc.reason, exc.detail, b"", 0, 0, b"")
        except ThrottleLost:
            raise
        except Exception as exc:  # noqa: BLE001 -- a bug must not lose the row; the reject ratio shows it
            log.exception("download: unexpected error for %s", row["image_url"])
            return ("rejected", "internal_error", f"{type(exc).__name__}: {exc}"[:300], b"", 0, 0, b"")
        return ("ok", None, None, pixels.tobytes(), pixels.shape[1], pixels.shape[0], thumb)

    def _decode(self, data: bytes):
        img = imaging.decode(data, self.cfg.max_pixels)  # decoded once: model input and thumbnail
        thumb = imaging.thumbnail(img, self.cfg.thumbnail_size) if self.cfg.thumbnail_size else b""
        if self.full_size:
            return imaging.fit(img, self.full_size), thumb
        return imaging.preprocess(img, self.size), thumb

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, after retries and redirects, or the last attempt's FetchError."""
        attempt = hops = 0
        self.policy.check_url(url)
        while True:
            try:
                return await self._attempt(url)
            except Redirect as r:
                hops += 1
                if hops > self.cfg.max_redirects:
                    raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects}, last to {r.location}")
                self.counts["redirects"] += 1
                self.policy.check_url(r.location, redirected=True)
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
                return await self._in_time(self._read_local, url)
        host = self.host(f"{parts.scheme}://{parts.netloc}")
        async with host.gate:
            probe = await host.admit()
            failed = True
            try:
                async with self.slots:
                    await self._take_slot()
                    self.counts["requests"] += 1
                    if parts.scheme == "gs":
                        data = await self._in_time(self._read_file, url)
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
                    self._check_opt_out(resp.headers)
                    raise FetchError(f"http_{resp.status}", f"{resp.status} {resp.reason or ''}".strip(),
                                     transient=resp.status in TRANSIENT_STATUS,
                                     retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                self._check_opt_out(resp.headers)
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
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, urlpolicy.BlockedAddress):
                raise FetchError("blocked_address", str(exc.os_error)[:300]) from None
            raise FetchError("connection_error", f"{type(exc).__name__}: {exc}"[:200], transient=True) from None
        except aiohttp.ClientError as exc:
            raise FetchError("connection_error", f"{type(exc).__name__}: {exc}"[:200], transient=True) from None

    def _check_opt_out(self, headers) -> None:
        """X-Robots-Tag: noai / noimageai / noindex (download.opt_out_tags): the server opts out of crawls."""
        values = headers.getall("X-Robots-Tag", [])
        # "googlebot: noindex" names one crawler; we honour a directive whoever it is addressed to.
        tags = {t.strip().lower() for v in values for t in v.replace(":", ",").split(",")}
        hit = sorted(tags & self.opt_out)
        if hit:
            raise FetchError("opt_out", f"X-Robots-Tag: {', '.join(hit)}")

    async def _in_time(self, read, url: str) -> bytes:
        """A blocking read in the reader pool, under the same total timeout as an HTTP request."""
        future = asyncio.get_running_loop().run_in_executor(self.readers, read, url)
        try:
            return await asyncio.wait_for(future, self.cfg.total_timeout_s)
        except asyncio.TimeoutError:
            raise FetchError("timeout", f"not read within {self.cfg.total_timeout_s:g}s") from None

    def _read_local(self, url: str) -> bytes:
        return self.policy.open_file(url, self.cfg.max_bytes)

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
