"""The outcomes of one fetch attempt that are not a body: each becomes a reject reason or a retry."""


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
