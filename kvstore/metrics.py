"""The kvstore's Prometheus metrics: what it ingests, how big the index is, how fast it answers."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from kvmesh_proto.v1 import kvstore_pb2
from kvstore.registry import BlockRegistry

log = logging.getLogger(__name__)

EVENTS = Counter("kvmesh_kvstore_events_total", "KV events ingested, by type (stored, removed, cleared)", ["type"])
BLOCK_EVENTS = Counter("kvmesh_kvstore_event_blocks_total", "Block hashes named by ingested events", ["type"])
BATCHES = Counter("kvmesh_kvstore_batches_total", "KV event batches ingested")
FIND_MATCHES_SECONDS = Histogram("kvmesh_kvstore_find_matches_seconds", "FindMatches latency incl. Redis",
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))  # fmt: skip
INDEX_BLOCKS = Gauge("kvmesh_kvstore_index_blocks", "(worker, block) entries in the index")
INDEX_WORKERS = Gauge("kvmesh_kvstore_index_workers", "Workers with blocks in the index")
REGISTRY_AVAILABLE = Gauge("kvmesh_kvstore_registry_available", "1 while Redis answers, 0 while it doesn't")
INDEX_FOLLOWERS = Gauge("kvmesh_kvstore_index_followers", "Routers following the index (WatchIndex streams)")
RESYNCS_ASKED = Counter("kvmesh_kvstore_resyncs_asked_total",
                        "Full resyncs the kvstore asked of connected workers because Redis lost the index")  # fmt: skip


def observe_batch(batch: kvstore_pb2.KvEventBatch) -> None:
    BATCHES.inc()
    for event in batch.events:
        kind = event.WhichOneof("event") or "unknown"
        EVENTS.labels(kind).inc()
        if kind in ("stored", "removed"):
            BLOCK_EVENTS.labels(kind).inc(len(getattr(event, kind).block_hashes))


async def refresh_index_gauges(registry: BlockRegistry, interval_s: float = 2.0) -> None:
    """Keep the index-size gauges current (one Redis snapshot per interval, not per scrape)."""
    while True:
        try:
            stats = await registry.stats()
            INDEX_BLOCKS.set(stats.blocks)
            INDEX_WORKERS.set(len(stats.workers))
        except RedisError as exc:
            log.debug("index gauges not refreshed: %s", exc)
        await asyncio.sleep(interval_s)
