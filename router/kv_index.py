"""The router's client of the kvstore: per-worker prefix overlap, or nothing.

By default the router *follows* the index (``WatchIndex``: a snapshot, then every change) and
answers from its own copy (``router/prefix_index.py``), so a decision costs no network hop.
Until the copy is complete — at start, or after the stream broke — it asks the kvstore
(``FindMatches``) per request instead.

The KV-event path and the request path are separate: when the kvstore is slow or gone,
``find_overlaps`` answers None within its deadline and the request is routed on load
alone. Losing the index degrades routing, never a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from kvmesh.discovery import Discovery, Membership
from kvmesh.grpc_service import mesh_channel
from kvmesh.telemetry import outgoing_metadata
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

_FOLLOW_RETRY_S = 0.5


class KvIndexClient:
    def __init__(self, discovery: Discovery, timeout_ms: int, follow: bool = True) -> None:
        self._kvstores = Membership(discovery, "kvstore")
        self._timeout_s = timeout_ms / 1000
        self._address = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: kvstore_pb2_grpc.KvStoreStub | None = None
        self._follow = follow
        self._follow_task: asyncio.Task | None = None
        self.index = PrefixIndex()
        # True while the local copy is complete (snapshot received, stream unbroken).
        self.following = False
        self.available = False

    async def start(self) -> None:
        await self._kvstores.start()
        if self._follow:
            self._follow_task = asyncio.create_task(self._follow_index(), name="kv-index-follow")

    async def stop(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
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

    async def _follow_index(self) -> None:
        """Keep ``index`` a copy of the kvstore's; on any break, start over from a snapshot."""
        while True:
            stub = self._current_stub()
            if stub is not None:
                try:
                    async for update in stub.WatchIndex(kvstore_pb2.WatchIndexRequest(), metadata=outgoing_metadata()):
                        if update.snapshot_done:
                            self.following = self.available = True
                            log.info("following the kvstore's index (%d blocks)", self.index.blocks)
                        else:
                            self.index.apply(update.batch)
                except grpc.aio.AioRpcError as exc:
                    if self.following:
                        log.warning("index stream broke (%s: %s); querying the kvstore until it is back",
                                    exc.code().name, exc.details())  # fmt: skip
            self.following = self.available = False
            self.index.clear()
            await asyncio.sleep(_FOLLOW_RETRY_S)

    async def find_overlaps(self, model: str, block_hashes: list[int]) -> dict[str, int] | None:
        """Leading blocks of ``block_hashes`` each worker holds; None when the index can't say."""
        if not block_hashes:
            return {}
        if self.following:
            return self.index.overlaps(model, block_hashes)
        stub = self._current_stub()
        if stub is None:
            self.available = False
            return None
        request = kvstore_pb2.FindMatchesRequest(model=model, block_hashes=block_hashes)
        try:
            reply = await stub.FindMatches(request, timeout=self._timeout_s, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as exc:
            if self.available:
                log.warning("kvstore FindMatches failed (%s); routing on load only", exc.code().name)
            self.available = False
            return None
        self.available = True
        return {match.worker_id: match.matched_blocks for match in reply.matches}
