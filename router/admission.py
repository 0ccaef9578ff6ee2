"""Bounded admission: the router holds at most ``max_inflight_requests`` requests at once.

Beyond the bound a request is refused at once with RESOURCE_EXHAUSTED (HTTP 429 and
Retry-After) instead of queueing: an unbounded queue only turns overload into timeouts
and memory growth, while a refusal lets the client back off or go to another router.
"""

from __future__ import annotations

from router.errors import exhausted

# A request on this small model takes about a second; a client retrying sooner only adds load.
RETRY_AFTER_S = 1.0


class InflightSlot:
    """One admitted request; ``release`` may be called any number of times."""

    def __init__(self, limit: InflightLimit) -> None:
        self._limit: InflightLimit | None = limit

    def release(self) -> None:
        if self._limit is not None:
            self._limit.inflight -= 1
            self._limit = None


class InflightLimit:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.refused = 0

    def acquire(self) -> InflightSlot:
        """A slot, or RESOURCE_EXHAUSTED when ``limit`` requests are already in flight (0 = no limit)."""
        if self.limit and self.inflight >= self.limit:
            self.refused += 1
            raise exhausted(f"the router is at its limit of {self.limit} requests in flight; retry shortly",
                            RETRY_AFTER_S)  # fmt: skip
        self.inflight += 1
        return InflightSlot(self)
