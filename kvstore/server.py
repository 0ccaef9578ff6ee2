"""kvstore process wiring: the KvStore gRPC service over the Redis block registry.

Also the one place that ties the index to membership: when a worker's etcd lease
disappears its blocks are purged at once, and at start-up the index forgets workers
that are no longer registered (they died while no kvstore was watching). And to Redis's
health: when Redis lost the index, every connected worker is asked for a full resync
(``registry_monitor.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError

from kvmesh.config import KvStoreSettings, load_settings
from kvmesh.discovery import Membership, MembershipEvent
from kvmesh.grpc_service import ServiceProcess
from kvmesh.logging_setup import setup_logging
from kvmesh.telemetry import incoming_context, tracer
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvstore import metrics
from kvstore.index_feed import FollowerLost, IndexFeed
from kvstore.registry import BlockRegistry
from kvstore.registry_monitor import RegistryMonitor
from kvstore.validation import InvalidInput

log = logging.getLogger(__name__)

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KvStore"].full_name


# An ack for no batch: the kvstore asks the worker for a full resync (Redis lost the index).
_RESYNC_ASK = kvstore_pb2.PublishAck(resync_required=True)


class KvStoreServicer(kvstore_pb2_grpc.KvStoreServicer):
    def __init__(self, registry: BlockRegistry, feed: IndexFeed) -> None:
        self.registry = registry
        self.feed = feed
        # One outbox per open Publish stream: acks, unsolicited resync asks, None at the end.
        self._outboxes: set[asyncio.Queue[kvstore_pb2.PublishAck | None]] = set()

    async def _abort_for(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """Map registry failures onto status codes: the caller's mistake vs retry later.

        Losing Redis also ends every index follower: changes are being lost, so their copies
        can no longer be trusted until a fresh snapshot."""
        if isinstance(exc, InvalidInput):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, RedisError):
            self.feed.fail_all(f"block registry lost Redis: {exc}")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"block registry unavailable: {exc}")
        raise exc

    def ask_resync(self, reason: str) -> None:
        """Ask every connected worker for a full resync (on its Publish stream). The index's
        followers lost what Redis lost: they start over from a snapshot too."""
        self.feed.fail_all(f"the block registry lost its index ({reason})")
        for outbox in self._outboxes:
            outbox.put_nowait(_RESYNC_ASK)
        metrics.RESYNCS_ASKED.inc(len(self._outboxes))

    async def Publish(
        self, request_iterator: AsyncIterator[kvstore_pb2.KvEventBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kvstore_pb2.PublishAck]:
        outbox: asyncio.Queue[kvstore_pb2.PublishAck | None] = asyncio.Queue()
        self._outboxes.add(outbox)
        ingest = asyncio.create_task(self._ingest(request_iterator, outbox))
        try:
            while (ack := await outbox.get()) is not None:
                yield ack
            try:
                await ingest
            except (InvalidInput, RedisError) as exc:
                await self._abort_for(context, exc)
        finally:
            self._outboxes.discard(outbox)
            ingest.cancel()

    async def _ingest(self, request_iterator: AsyncIterator[kvstore_pb2.KvEventBatch],
                      outbox: asyncio.Queue[kvstore_pb2.PublishAck | None]) -> None:  # fmt: skip
        try:
            async for batch in request_iterator:
                outbox.put_nowait(await self.registry.apply_batch(batch))
                metrics.observe_batch(batch)
        finally:
            outbox.put_nowait(None)

    async def FindMatches(
        self, request: kvstore_pb2.FindMatchesRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.FindMatchesResponse:
        try:
            with tracer().start_as_current_span("kvstore.FindMatches", incoming_context(context), SpanKind.SERVER,
                                                attributes={"kvmesh.blocks": len(request.block_hashes)}), \
                    metrics.FIND_MATCHES_SECONDS.time():  # fmt: skip
                if request.by_tier:
                    return await self._find_matches_by_tier(request)
                matches = await self.registry.find_matches(
                    request.model, list(request.block_hashes), list(request.worker_ids) or None
                )
        except (InvalidInput, RedisError) as exc:
            await self._abort_for(context, exc)
        return kvstore_pb2.FindMatchesResponse(
            matches=[kvstore_pb2.WorkerMatch(worker_id=w, matched_blocks=n) for w, n in matches]
        )

    async def _find_matches_by_tier(self, request: kvstore_pb2.FindMatchesRequest) -> kvstore_pb2.FindMatchesResponse:
        matches = await self.registry.find_matches_by_tier(
            request.model, list(request.block_hashes), list(request.worker_ids) or None
        )
        return kvstore_pb2.FindMatchesResponse(matches=[
            kvstore_pb2.WorkerMatch(worker_id=m.worker_id, matched_blocks=m.matched_blocks, host_blocks=m.host_blocks,
                                    disk_blocks=m.disk_blocks)
            for m in matches
        ])

    async def Purge(
        self, request: kvstore_pb2.PurgeRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.PurgeResponse:
        try:
            removed = await self.registry.purge(request.worker_id)
        except (InvalidInput, RedisError) as exc:
            await self._abort_for(context, exc)
        return kvstore_pb2.PurgeResponse(blocks_removed=removed)

    async def WatchIndex(
        self, request: kvstore_pb2.WatchIndexRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kvstore_pb2.IndexUpdate]:
        follower = self.feed.subscribe()  # before the snapshot is read: see index_feed
        metrics.INDEX_FOLLOWERS.inc()
        try:
            try:
                for worker in await self.registry.workers():
                    yield kvstore_pb2.IndexUpdate(batch=await self.registry.snapshot_batch(worker))
            except RedisError as exc:
                await self._abort_for(context, exc)
            yield kvstore_pb2.IndexUpdate(snapshot_done=True)
            while True:
                try:
                    batch = await follower.next()
                except FollowerLost as lost:
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED if lost.behind else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, str(lost))
                yield kvstore_pb2.IndexUpdate(batch=batch)
        finally:
            self.feed.unsubscribe(follower)
            metrics.INDEX_FOLLOWERS.dec()

    async def Stats(
        self, request: kvstore_pb2.KvStoreStatsRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.KvStoreStatsResponse:
        try:
            stats = await self.registry.stats()
        except RedisError as exc:
            log.warning("stats without registry: %s", exc)
            return kvstore_pb2.KvStoreStatsResponse(registry_available=False)
        return kvstore_pb2.KvStoreStatsResponse(
            blocks=stats.blocks,
            workers=[
                kvstore_pb2.WorkerBlocks(worker_id=w.worker_id, model=w.model, blocks=w.blocks, last_seq=w.last_seq)
                for w in stats.workers
            ],
            batches_ingested=stats.batches_ingested,
            blocks_ingested=stats.blocks_ingested,
            resyncs_requested=stats.resyncs_requested,
            registry_available=True,
        )


async def purge_unregistered(registry: BlockRegistry, live_worker_ids: set[str]) -> None:
    """Forget workers that hold blocks in the index but have no etcd registration."""
    for worker in await registry.workers():
        if worker.worker_id not in live_worker_ids:
            removed = await registry.purge(worker.worker_id)
            log.info("purged %d blocks of unregistered worker %s", removed, worker.worker_id)


def redis_client(settings: KvStoreSettings) -> aioredis.Redis:
    """The kvstore's Redis client: credentials from the URL or the settings, and short socket
    timeouts, so a dead or hung Redis fails a call in about a second instead of hanging it."""
    credentials = {"username": settings.redis_username or None, "password": settings.redis_password or None}
    return aioredis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0,
                             **{k: v for k, v in credentials.items() if v})  # fmt: skip


async def serve(settings: KvStoreSettings) -> None:
    redis = redis_client(settings)
    feed = IndexFeed()
    registry = BlockRegistry(redis, settings.namespace, on_change=feed.publish)
    process = ServiceProcess(settings, [SERVICE_NAME])
    servicer = KvStoreServicer(registry, feed)
    kvstore_pb2_grpc.add_KvStoreServicer_to_server(servicer, process.server)
    # A frozen index is not followed: routers fall back to asking, and so route on load alone.
    monitor = RegistryMonitor(redis, settings.namespace, servicer.ask_resync, on_lost=feed.fail_all)

    async def on_worker_change(event: MembershipEvent) -> None:
        if event.kind == "leave":
            removed = await registry.purge(event.info.instance_id)
            log.info("worker %s left: purged %d blocks", event.info.instance_id, removed)

    workers = Membership(process.discovery, "worker")
    workers.on_change(on_worker_change)
    try:
        await process.start(process.instance_info())
        try:
            await purge_unregistered(registry, set(await process.discovery.list("worker")))
        except RedisError as exc:
            log.warning("could not reconcile the index with etcd at start (%s)", exc)
        await workers.start()
        gauges = asyncio.create_task(metrics.refresh_index_gauges(registry), name="index-gauges")
        watch = asyncio.create_task(monitor.run(), name="registry-monitor")
        await process.wait_for_signal()
        gauges.cancel()
        watch.cancel()
    finally:
        await workers.stop()
        await process.shutdown()
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(KvStoreSettings, argv, prog="kvmesh kvstore")
    setup_logging(settings.log_level, "kvstore")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
