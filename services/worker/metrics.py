"""The worker's Prometheus metrics (served by the process's telemetry setup on /metrics).

Load gauges are refreshed from the same engine report that feeds the router's stats stream,
so /metrics and routing never disagree; counters move as requests and transfers finish.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from kvmesh_proto.v1 import worker_pb2

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

INFO = Gauge("kvmesh_worker_info", "Always 1; labels name the worker", ["worker_id", "role", "model"])
RUNNING = Gauge("kvmesh_worker_running_requests", "Requests being computed")
WAITING = Gauge("kvmesh_worker_waiting_requests", "Requests queued in the engine")
KV_BLOCKS = Gauge("kvmesh_worker_kv_blocks", (
    "KV blocks by state: used, cached, total (device pool); host, disk (lower tiers)"), ["state"])
PREFIX_HIT_RATE = Gauge("kvmesh_worker_prefix_hit_rate", "Prompt tokens served from the prefix cache / all")
PREEMPTIONS = Counter("kvmesh_worker_preemptions_total", "Sequences preempted because the KV pool ran dry")
REQUESTS = Counter("kvmesh_worker_requests_total", "Requests finished, by how the prompt was prefilled", ["path"])
PROMPT_TOKENS = Counter("kvmesh_worker_prompt_tokens_total", "Prompt tokens of the requests received")
CACHED_TOKENS = Counter("kvmesh_worker_cached_prompt_tokens_total", "Prompt tokens whose KV was already here")
GENERATED_TOKENS = Counter("kvmesh_worker_generated_tokens_total", "Tokens generated and streamed")
TRANSFER_BYTES = Counter("kvmesh_worker_kv_transfer_bytes_total", "KV bytes moved between workers", ["direction"])
TRANSFER_BLOCKS = Counter("kvmesh_worker_kv_transfer_blocks_total", "KV blocks moved between workers", ["direction"])
TRANSFER_SECONDS = Histogram("kvmesh_worker_kv_transfer_seconds",
                             "Remote prefill as the decode worker saw it: request to last KV chunk",
                             buckets=_LATENCY_BUCKETS)  # fmt: skip
TRANSFER_FALLBACKS = Counter("kvmesh_worker_kv_transfer_fallbacks_total",
                             "Remote prefills that failed and were prefilled locally")  # fmt: skip

_preemptions_seen = 0


def observe_stats(stats: worker_pb2.WorkerStats) -> None:
    """Refresh the load gauges from a stats report."""
    global _preemptions_seen
    RUNNING.set(stats.running_requests)
    WAITING.set(stats.waiting_requests)
    KV_BLOCKS.labels("used").set(stats.kv_blocks_used)
    KV_BLOCKS.labels("cached").set(stats.kv_blocks_cached)
    KV_BLOCKS.labels("total").set(stats.kv_blocks_total)
    KV_BLOCKS.labels("host").set(stats.kv_blocks_host)
    KV_BLOCKS.labels("disk").set(stats.kv_blocks_disk)
    PREFIX_HIT_RATE.set(stats.prefix_hit_rate)
    if stats.preemptions > _preemptions_seen:
        PREEMPTIONS.inc(stats.preemptions - _preemptions_seen)
        _preemptions_seen = stats.preemptions


def observe_transfer(direction: str, size_bytes: int, blocks: int) -> None:
    TRANSFER_BYTES.labels(direction).inc(size_bytes)
    TRANSFER_BLOCKS.labels(direction).inc(blocks)
