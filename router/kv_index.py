"""The router's client of the kvstore: per-worker prefix overlap, or nothing.

By default the router *follows* the index (``WatchIndex``: a snapshot, then every change) and
answers from its own copy (``router/prefix_index.py``), so a decision costs no network hop.
Until the copy is complete — at start, or after the stream broke — it asks the kvstore
(``FindMatches``) per request instead.

The KV-event path and the request path are separate: when the kvstore is slow or gone, or
its Redis is, ``find_overlaps`` answers None and the request is routed on load alone.
Losing the index degrades routing, never a request, and the router says so: the gauge
``kvmesh_router_kv_routing_degraded{reason}``, ``degraded_reason`` (in ``kvmesh status``).
While degraded, requests don't wait on the index at all: one lookup (or a background probe)
tries it again every ``_RETRY_S``, so kv routing resumes within a second of the index returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from kvmesh.discovery import Discovery, Membership
from kvmesh.grpc_service import mesh_channel
from kvmesh.telemetry import outgoing_metadata
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from router.metrics import KV_ROUTING_DEGRADED
from router.prefix_index import PrefixIndex
from router.scoring import PrefixOverlap

log = logging.getLogger(__name__)

DEGRADED_REASONS = ("no_kvstore", "kvstore_unreachable", "registry_unavailable", "timeout")
_RETRY_S = 0.5
# The kvstore's answer when its Redis is down (kvstore/server.py).
_REGISTRY_DOWN_PREFIX = "block registry unavailable"


def _reason_of(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if (exc.details() or "").startswith(_REGISTRY_DOWN_PREFIX):
        return "registry_unavailable"
    return "kvstore_unreachable"


class KvIndexClient:
    def __init__(self, discovery: Discovery, timeout_ms: int, follow: bool = True) -> None:
        self._kvstores = Membership(discovery, "kvstore")
        self._timeout_s = timeout_ms / 1000
        self._address = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: kvstore_pb2_grpc.KvStoreStub | None = None
        self._follow = follow
        self._tasks: list[asyncio.Task] = []
        self.index = PrefixIndex()
        # True while the local copy is complete (snapshot received, stream unbroken).
        self.following = False
        self.degraded_reason = ""  # empty while the index answers (or was never asked)
        self._retry_at = 0.0
        self._last_answer_at = 0.0
        self._set_degraded("")

    async def start(self) -> None:
        await self._kvstores.start()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="kv-index-probe"))
        if self._follow:
            self._tasks.append(asyncio.create_task(self._follow_index(), name="kv-index-follow"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._kvstores.stop()
        if self._channel is not None:
            await self._channel.close()

    def _current_stub(self) -> kvstore_pb2_grpc.KvStoreStub | None:
        addresses = sorted(info.address for info in self._kvstores.instances.values())
        if not addresses:
            return None
        if addresses[0] != self._address:
            self._address = addresses[0]
            self._channel = mesh_channel(self._address)
            self._stub = kvstore_pb2_grpc.KvStoreStub(self._channel)
        return self._stub

    def _set_degraded(self, reason: str) -> None:
        if reason != self.degraded_reason:
            if reason:
                log.warning("KV index unusable (%s); routing on load only", reason)
            else:
                log.info("KV index answers again; kv routing resumed")
        self.degraded_reason = reason
        self._retry_at = time.monotonic() + _RETRY_S if reason else 0.0
        for name in DEGRADED_REASONS:
            KV_ROUTING_DEGRADED.labels(name).set(1 if name == reason else 0)

    @property
    def available(self) -> bool:
        """The index answers (kv routing), as far as the last lookup or probe knows."""
        return not self.degraded_reason

    def _answered(self) -> None:
        self._last_answer_at = time.monotonic()
        self._set_degraded("")

    async def _follow_index(self) -> None:
        """Keep ``index`` a copy of the kvstore's; on any break, start over from a snapshot."""
        while True:
            stub = self._current_stub()
            if stub is not None:
                try:
                    async for update in stub.WatchIndex(kvstore_pb2.WatchIndexRequest(), metadata=outgoing_metadata()):
                        if update.snapshot_done:
                            self.following = True
                            self._answered()
                            log.info("following the kvstore's index (%d blocks)", self.index.blocks)
                        else:
                            self.index.apply(update.batch)
                except grpc.aio.AioRpcError as exc:
                    if self.following:
                        log.warning("index stream broke (%s: %s); querying the kvstore until it is back",
                                    exc.code().name, exc.details())  # fmt: skip
                except Exception:  # a bug here must not end the following for good: start over
                    log.exception("following the index failed; querying the kvstore until a new snapshot")
            self.following = False
            self.index.clear()
            await asyncio.sleep(_RETRY_S)

    async def find_overlaps(self, model: str, block_hashes: list[int]) -> dict[str, PrefixOverlap] | None:
        """Leading blocks of ``block_hashes`` each worker holds (split by KV tier); None when the
        index can't say."""
        if not block_hashes:
            return {}
        if self.following:
            return self.index.overlaps(model, block_hashes)
        if self.degraded_reason and time.monotonic() < self._retry_at:
            return None  # fail fast: the last try failed a moment ago
        stub = self._current_stub()
        if stub is None:
            self._set_degraded("no_kvstore")
            return None
        request = kvstore_pb2.FindMatchesRequest(model=model, block_hashes=block_hashes, by_tier=True)
        try:
            reply = await stub.FindMatches(request, timeout=self._timeout_s, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as exc:
            self._set_degraded(_reason_of(exc))
            return None
        self._answered()
        return {match.worker_id: PrefixOverlap(match.matched_blocks, match.host_blocks, match.disk_blocks)
                for match in reply.matches}

    async def _probe_loop(self) -> None:
        """Keep ``degraded_reason`` true for an idle router too (``kvmesh status``)."""
        while True:
            await asyncio.sleep(_RETRY_S)
            if self.following or time.monotonic() - self._last_answer_at < _RETRY_S:
                continue  # the followed copy, or requests, keep the state fresh
            stub = self._current_stub()
            if stub is None:
                self._set_degraded("no_kvstore")
                continue
            try:
                stats = await stub.Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=max(self._timeout_s, 2.0))
            except grpc.aio.AioRpcError as exc:
                self._set_degraded(_reason_of(exc))
                continue
            if stats.registry_available:
                self._answered()
            else:
                self._set_degraded("registry_unavailable")
