"""The router's client of the kvstore: per-worker prefix overlap, or nothing.

The KV-event path and the request path are separate: when the kvstore is slow or gone,
``find_overlaps`` answers None within its deadline and the request is routed on load
alone. Losing the index degrades routing, never a request.
"""

from __future__ import annotations

import logging

import grpc

from kvmesh.discovery import Discovery, Membership
from kvmesh.grpc_service import mesh_channel
from kvmesh.telemetry import outgoing_metadata
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from router.scoring import PrefixOverlap

log = logging.getLogger(__name__)


class KvIndexClient:
    def __init__(self, discovery: Discovery, timeout_ms: int) -> None:
        self._kvstores = Membership(discovery, "kvstore")
        self._timeout_s = timeout_ms / 1000
        self._address = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: kvstore_pb2_grpc.KvStoreStub | None = None
        self.available = False

    async def start(self) -> None:
        await self._kvstores.start()

    async def stop(self) -> None:
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

    async def find_overlaps(self, model: str, block_hashes: list[int]) -> dict[str, PrefixOverlap] | None:
        """Leading blocks of ``block_hashes`` each worker holds (split by KV tier); None when the
        index can't say."""
        if not block_hashes:
            return {}
        stub = self._current_stub()
        if stub is None:
            self.available = False
            return None
        request = kvstore_pb2.FindMatchesRequest(model=model, block_hashes=block_hashes, by_tier=True)
        try:
            reply = await stub.FindMatches(request, timeout=self._timeout_s, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as exc:
            if self.available:
                log.warning("kvstore FindMatches failed (%s); routing on load only", exc.code().name)
            self.available = False
            return None
        self.available = True
        return {match.worker_id: PrefixOverlap(match.matched_blocks, match.host_blocks, match.disk_blocks)
                for match in reply.matches}
