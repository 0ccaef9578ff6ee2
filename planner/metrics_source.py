"""What the planner sees: the routers' latency histograms and token counters (their Prometheus
``/metrics``) and every worker's load report (its ``Worker.Stats`` stream, one message a look).

Percentiles are taken over a sliding window by subtracting the cumulative histogram buckets
seen ``window_s`` ago from today's, so a burst an hour old no longer counts and no request is
counted twice. Workers are read through ``Stats`` rather than their ``/metrics`` because mock
workers share one process (and one Prometheus registry) in a fleet, while each has its own
Stats stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.discovery import Discovery
from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_SCRAPE_TIMEOUT_S = 2.0
# Router counters the planner turns into rates (summed over their labels).
_COUNTERS = {
    "kvmesh_router_requests": "requests",
    "kvmesh_router_prompt_tokens": "prompt_tokens",
    "kvmesh_router_cached_tokens": "cached_tokens",
    "kvmesh_router_output_tokens": "output_tokens",
}
_HISTOGRAMS = {"kvmesh_router_ttft_seconds": "ttft", "kvmesh_router_itl_seconds": "itl"}


@dataclass
class RouterSample:
    """One scrape of every router, summed: cumulative counters and histogram buckets."""

    at_s: float
    counters: dict[str, float] = field(default_factory=dict)
    # histogram name -> {upper bound: cumulative count}
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)


def parse_router_metrics(text: str, into: RouterSample) -> None:
    """Add one router's exposition to ``into`` (several routers' samples sum)."""
    for family in text_string_to_metric_families(text):
        if family.name in _COUNTERS:
            key = _COUNTERS[family.name]
            total = sum(s.value for s in family.samples if s.name.endswith("_total"))
            into.counters[key] = into.counters.get(key, 0.0) + total
        elif family.name in _HISTOGRAMS:
            buckets = into.buckets.setdefault(_HISTOGRAMS[family.name], {})
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (Prometheus' rule: linear within a bucket;
    past the last finite bound, that bound). None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {bound: count - old.get(bound, 0.0) for bound, count in new.items()}


@dataclass
class WorkerLoad:
    """One worker as the planner sees it."""

    worker_id: str
    role: str
    address: str
    pid: int
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    tokens_per_s: float = 0.0


@dataclass
class MetricWindow:
    """Everything one decision is taken on."""

    at_s: float
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    requests_in_window: float = 0.0
    # Over the window (what the load predictor is fed), from requests that finished in it:
    request_rate: float = 0.0
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    workers: list[WorkerLoad] = field(default_factory=list)

    def pool(self, role: str) -> list[WorkerLoad]:
        return [w for w in self.workers if w.role == role]

    def waiting(self, role: str) -> int:
        """Requests queued behind the running batches of ``role``'s workers."""
        return sum(w.waiting for w in self.pool(role))

    def in_flight(self, role: str) -> int:
        """Requests running or queued on ``role``'s workers (a prefill worker runs several
        prompts' chunks in one step, so its backlog shows as running, not waiting)."""
        return sum(w.running + w.waiting for w in self.pool(role))


class RouterWindow:
    """Router samples over the last ``window_s`` seconds, turned into a ``MetricWindow``."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[RouterSample] = deque()

    def add(self, sample: RouterSample) -> None:
        self._samples.append(sample)
        # Keep one sample at or before the window's start: it is the baseline subtracted.
        while len(self._samples) > 2 and self._samples[1].at_s <= sample.at_s - self.window_s:
            self._samples.popleft()

    def summarize(self, workers: list[WorkerLoad]) -> MetricWindow:
        latest = self._samples[-1]
        window = MetricWindow(latest.at_s, workers=workers)
        if len(self._samples) < 2:
            return window
        oldest = self._samples[0]
        ttft = _delta(latest.buckets.get("ttft", {}), oldest.buckets.get("ttft", {}))
        itl = _delta(latest.buckets.get("itl", {}), oldest.buckets.get("itl", {}))
        window.ttft_p90_s = histogram_quantile(ttft, 0.9)
        window.itl_p90_s = histogram_quantile(itl, 0.9)
        window.requests_in_window = max(ttft.values(), default=0.0)
        # Over the whole window: per-interval counts of a few requests are too noisy to extrapolate.
        counters = {k: latest.counters.get(k, 0.0) - oldest.counters.get(k, 0.0) for k in _COUNTERS.values()}
        seconds = max(latest.at_s - oldest.at_s, 1e-6)
        requests = counters["requests"]
        window.request_rate = requests / seconds
        if requests > 0:
            window.mean_prompt_tokens = counters["prompt_tokens"] / requests
            window.mean_output_tokens = counters["output_tokens"] / requests
        window.prefill_tokens_per_s = (counters["prompt_tokens"] - counters["cached_tokens"]) / seconds
        window.decode_tokens_per_s = counters["output_tokens"] / seconds
        return window


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as response:
        return response.read().decode()


def metrics_url(info: common_pb2.InstanceInfo) -> str:
    """The instance's /metrics URL, as `kvmesh status` shows it."""
    return f"http://{info.address.rpartition(':')[0]}:{info.metrics_port}/metrics"


async def read_worker(info: common_pb2.InstanceInfo) -> WorkerLoad:
    """One load report from the worker (zeros when it does not answer: it may be starting)."""
    load = WorkerLoad(info.instance_id, info.role, info.address, info.pid)
    try:
        async with mesh_channel(info.address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.WorkerStatsRequest(interval_ms=1000),
                                                             timeout=_SCRAPE_TIMEOUT_S)  # fmt: skip
            stats = await call.read()
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        log.debug("worker %s stats: %s", info.instance_id, exc.code())
        return load
    load.running, load.waiting = stats.running_requests, stats.waiting_requests
    load.kv_usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
    load.tokens_per_s = stats.tokens_per_s
    return load


class MetricsSource:
    """Reads the mesh once per planner tick.

    A worker missing from etcd for less than ``absent_grace_s`` still counts, in the role it
    last had: on a loaded machine a lease can lapse for a moment before the worker registers
    again, and a pool that seemed to shrink for one look would call for a worker it has.
    """

    def __init__(self, discovery: Discovery, window_s: float, absent_grace_s: float = 10.0) -> None:
        self._discovery = discovery
        self._routers = RouterWindow(window_s)
        self._absent_grace_s = absent_grace_s
        self._seen: dict[str, tuple[common_pb2.InstanceInfo, float]] = {}

    def _workers(self, registered: Iterable[common_pb2.InstanceInfo], now: float) -> list[common_pb2.InstanceInfo]:
        for info in registered:
            self._seen[info.instance_id] = (info, now)
        self._seen = {k: (info, at) for k, (info, at) in self._seen.items() if now - at <= self._absent_grace_s}
        return sorted((info for info, _ in self._seen.values()), key=lambda info: info.instance_id)

    async def _router_sample(self, routers: Iterable[common_pb2.InstanceInfo]) -> RouterSample:
        sample = RouterSample(time.monotonic())
        for info in routers:
            if not info.metrics_port:
                continue
            try:
                parse_router_metrics(await asyncio.to_thread(_scrape, metrics_url(info)), sample)
            except (OSError, ValueError) as exc:
                log.warning("cannot scrape router %s: %s", info.instance_id, exc)
        return sample

    async def read(self) -> MetricWindow:
        instances = await self._discovery.list()
        routers = [i for i in instances.values() if i.kind == "router"]
        workers = [i for i in instances.values() if i.kind == "worker" and i.role in ("prefill", "decode")]
        self._routers.add(await self._router_sample(routers))
        loads = await asyncio.gather(*(read_worker(info) for info in self._workers(workers, time.monotonic())))
        return self._routers.summarize(list(loads))
