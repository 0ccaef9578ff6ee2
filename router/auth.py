"""API keys and per-key rate limits of the router's front doors (HTTP and gRPC).

A key arrives as ``Authorization: Bearer KEY`` (an HTTP header, or gRPC metadata
``authorization``). Every configured key is compared with ``hmac.compare_digest`` and the
loop never stops early, so the time a refusal takes says nothing about how close a guess
was. With no key configured the door is open, as before keys existed.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvmesh.config import RouterSettings
from kvmesh.tls import metadata_value
from router.errors import RouterError, exhausted

_BEARER = "bearer "


@dataclass
class TokenBucket:
    """``rate`` requests per second on average, bursts of up to ``burst``."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Spend one token; 0 if admitted, else the seconds until one will be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class FrontDoorAuth:
    """Who may call (API keys) and how often (a token bucket per key)."""

    def __init__(self, api_keys: list[str], rate_per_s: float = 0.0, burst: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._keys = [key.encode() for key in api_keys]
        self._rate = rate_per_s
        self._burst = float(burst or max(1, round(rate_per_s)))
        self._clock = clock
        self._buckets: dict[int, TokenBucket] = {}
        self._lock = threading.Lock()  # HTTP and gRPC share one event loop, but tests may not

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> FrontDoorAuth:
        keys = [key.strip() for key in settings.api_keys.split(",") if key.strip()]
        return cls(keys, settings.api_key_rate_limit, settings.api_key_burst)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _key_index(self, authorization: str | None) -> int:
        if not authorization or not authorization[: len(_BEARER)].lower() == _BEARER:
            raise RouterError(grpc.StatusCode.UNAUTHENTICATED,
                              "an API key is required: send 'Authorization: Bearer <key>'")  # fmt: skip
        offered = authorization[len(_BEARER):].strip().encode()
        matches = [hmac.compare_digest(offered, key) for key in self._keys]  # all compared, always
        if not any(matches):
            raise RouterError(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid")
        return matches.index(True)

    def admit(self, authorization: str | None, rate_limited: bool = True) -> None:
        """Raise UNAUTHENTICATED for a missing or wrong key, RESOURCE_EXHAUSTED past the key's rate."""
        if not self.enabled:
            return
        index = self._key_index(authorization)
        if not rate_limited or self._rate <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.setdefault(index, TokenBucket(self._rate, self._burst, self._burst, now))
            wait_s = bucket.take(now)
        if wait_s:
            raise exhausted(f"rate limit of this API key exceeded ({self._rate:g} requests/s); retry later", wait_s)


def grpc_authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The ``authorization`` metadata value of a gRPC call, if any."""
    return metadata_value(context.invocation_metadata(), "authorization") or None
