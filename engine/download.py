"""Download stage: catalog rows -> decoded, model-ready pixels, or a reject with a reason.

A Ray Data actor with a fraction of a CPU; the concurrency lives inside it (asyncio), so two
cores can keep many fetches in flight. Every input row leaves as exactly one output row with
``status`` "ok" or "rejected" -- nothing is dropped, nothing raises out of a batch.
"""
from __future__ import annotations

import asyncio
import random
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from engine import imaging
from engine.catalog import CATALOG_FIELDS, normalise
from engine.config import DownloadConfig

CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.&'+-]{0,63}$")
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
RESULT_FIELDS = [pa.field("status", pa.string()), pa.field("reason", pa.string()),
                 pa.field("detail", pa.string()), pa.field("pixels", pa.binary())]


class FetchError(Exception):
    def __init__(self, reason: str, detail: str, transient: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient, self.retry_after = reason, detail, transient, retry_after


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


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class DownloadStage:
    def __init__(self, cfg: dict, image_size: int, storage_options: dict | None = None):
        self.cfg = DownloadConfig.model_validate(cfg)
        self.storage_options = storage_options  # GCS endpoint/credentials for gs:// image URLs
        self.size = image_size
        self.loop = asyncio.new_event_loop()
        self.session = None
        self.cpu = ThreadPoolExecutor(max_workers=2)

    async def _session(self):
        import aiohttp

        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.timeout_s, sock_read=self.cfg.timeout_s)
            self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=True)
        return self.session

    async def _fetch_http(self, url: str) -> bytes:
        import aiohttp

        session = await self._session()
        try:
            async with session.get(url, allow_redirects=True) as resp:
                if resp.status != 200:
                    raise FetchError(f"http_{resp.status}", f"{resp.status} {resp.reason}",
                                     transient=resp.status in TRANSIENT_STATUS,
                                     retry_after=_retry_after(resp.headers.get("Retry-After")))
                declared = resp.content_length
                if declared is not None and declared > self.cfg.max_bytes:
                    raise FetchError("too_large", f"{declared} bytes > {self.cfg.max_bytes}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > self.cfg.max_bytes:
                        raise FetchError("too_large", f"> {self.cfg.max_bytes} bytes")
                return bytes(body)
        except FetchError:
            raise
        except asyncio.TimeoutError:
            raise FetchError("timeout", f"no answer within {self.cfg.timeout_s}s", transient=True) from None
        except aiohttp.ClientPayloadError as exc:
            raise FetchError("truncated", str(exc)[:200], transient=True) from None
        except aiohttp.ClientError as exc:
            raise FetchError("connection_error", f"{type(exc).__name__}: {exc}"[:200], transient=True) from None

    def _read_file(self, url: str) -> bytes:
        from engine.storage import fs_for

        try:
            fs, path = fs_for(url, self.storage_options)
            size = fs.size(path)
            if size is not None and size > self.cfg.max_bytes:
                raise FetchError("too_large", f"{size} bytes > {self.cfg.max_bytes}")
            with fs.open(path, "rb") as f:
                return f.read()
        except FetchError:
            raise
        except FileNotFoundError:
            raise FetchError("not_found", f"no such file: {url}") from None
        except (IsADirectoryError, PermissionError, OSError) as exc:
            raise FetchError("read_error", f"{type(exc).__name__}: {exc}"[:200]) from None

    async def _fetch(self, url: str) -> bytes:
        attempt = 0
        while True:
            try:
                if url.startswith(("http://", "https://")):
                    return await self._fetch_http(url)
                return await self.loop.run_in_executor(self.cpu, self._read_file, url)
            except FetchError as exc:
                if not exc.transient or attempt >= self.cfg.retries:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else 0.5 * 2 ** attempt
                await asyncio.sleep(min(delay, 30.0) * (1 + 0.1 * random.random()))
                attempt += 1

    async def _one(self, row: dict, gate: asyncio.Semaphore) -> tuple:
        bad = check_row(row)
        if bad:
            return ("rejected", *bad, b"")
        async with gate:
            try:
                data = await self._fetch(row["image_url"])
            except FetchError as exc:
                return ("rejected", exc.reason, exc.detail, b"")
        try:
            pixels = await self.loop.run_in_executor(
                self.cpu, imaging.prepare, data, self.size, self.cfg.max_pixels)
        except imaging.ImageRejected as exc:
            return ("rejected", exc.reason, exc.detail, b"")
        return ("ok", None, None, pixels.tobytes())

    async def _all(self, rows: list[dict]) -> list[tuple]:
        gate = asyncio.Semaphore(self.cfg.concurrency)
        return await asyncio.gather(*(self._one(r, gate) for r in rows))

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = normalise(batch)
        rows = batch.select(list(CATALOG_FIELDS)).to_pylist()
        results = self.loop.run_until_complete(self._all(rows))
        for i, field in enumerate(RESULT_FIELDS):
            batch = batch.append_column(field, pa.array([r[i] for r in results], field.type))
        return batch

    def __del__(self):
        if self.session is not None and not self.loop.is_closed():
            self.loop.run_until_complete(self.session.close())
