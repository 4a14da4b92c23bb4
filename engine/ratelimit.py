"""The run's global request rate: one ``Throttle`` actor hands out send slots, each actor's
``RateGate`` sends at them or not at all (see engine/download.py for why)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

from engine.config import DownloadConfig
from engine.fetcherror import ThrottleLost

LATE_S = 0.03            # a slot used later than this is discarded: see engine/download.py
HEADROOM = 0.03          # the schedule runs this much below max_rps: (1 - 0.03) * (1 + 0.03) < 1
LEASE_HORIZON_S = 0.25   # slots are handed out at most this far ahead
LEASE_CHUNK_S = 0.05     # ... and in chunks worth at least this long, to keep lease calls few


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
