"""One host as one download actor sees it: its share of connections, Retry-After pauses, a circuit breaker."""
from __future__ import annotations

import asyncio
import collections
import logging
import time

from engine.config import DownloadConfig
from engine.fetcherror import FetchError

log = logging.getLogger("engine.download")
MAX_COOLDOWN_DOUBLINGS = 3


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
