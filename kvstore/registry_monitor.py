"""Noticing that Redis lost the index, so the workers rebuild it.

The index lives only in Redis (started without persistence by ``kvmesh up``). When Redis
restarts or is replaced it comes back empty, and a worker that publishes nothing for a while
would never learn that its blocks vanished. So the kvstore keeps an epoch marker in Redis
(``kvmesh:<ns>:epoch``, a random value set when missing) and polls it: a marker that changed,
or Redis answering again after failing, means the index may have lost events, and every
connected worker is asked for a full resync on its ``Publish`` stream.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvstore import metrics

log = logging.getLogger(__name__)

# KEYS: the marker. ARGV: a fresh epoch, set only if the marker is missing.
_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


class RegistryMonitor:
    """Polls Redis; calls ``on_reset`` when the index may have lost state since the last poll,
    and ``on_lost`` when Redis stops answering (the index is frozen from then on)."""

    def __init__(self, redis: aioredis.Redis, namespace: str, on_reset: Callable[[str], None],
                 on_lost: Callable[[str], None] = lambda reason: None, interval_s: float = 0.5) -> None:  # fmt: skip
        self._epoch_script = redis.register_script(_EPOCH)
        self._key = f"kvmesh:{namespace}:epoch"
        self._on_reset = on_reset
        self._on_lost = on_lost
        self._interval_s = interval_s
        self._epoch: bytes | None = None
        self.available: bool | None = None  # None until the first poll

    async def check(self) -> None:
        """One poll (the loop's body)."""
        try:
            epoch = await self._epoch_script(keys=[self._key], args=[uuid.uuid4().hex])
        except RedisError as exc:
            if self.available:
                log.warning("Redis unavailable (%s): the index is frozen, routing degrades to load only", exc)
                self._on_lost(f"Redis unavailable: {exc}")
            self.available = False
            metrics.REGISTRY_AVAILABLE.set(0)
            return
        reason = ""
        if self._epoch is not None and epoch != self._epoch:
            reason = "Redis lost the index (restarted or replaced)"
        elif self.available is False:
            reason = "Redis is reachable again"
        self._epoch, self.available = epoch, True
        metrics.REGISTRY_AVAILABLE.set(1)
        if reason:
            log.warning("%s: asking every worker for a full resync", reason)
            self._on_reset(reason)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)
