"""Windowed percentiles from the router's real Prometheus histograms and counters."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from planner.metrics_source import RouterSample, RouterWindow, histogram_quantile, parse_router_metrics


class FakeRouter:
    """The router's TTFT / ITL histograms and counters, on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("kvmesh_router_ttft_seconds", "", ["route"], registry=self.registry,
                              buckets=(0.1, 0.5, 1, 2.5, 5, 10))  # fmt: skip
        self.itl = Histogram("kvmesh_router_itl_seconds", "", ["route"], registry=self.registry,
                             buckets=(0.01, 0.02, 0.04, 0.08, 0.16))  # fmt: skip
        self.requests = Counter("kvmesh_router_requests_total", "", ["status"], registry=self.registry)
        self.prompt = Counter("kvmesh_router_prompt_tokens_total", "", ["route"], registry=self.registry)
        self.output = Counter("kvmesh_router_output_tokens_total", "", ["route"], registry=self.registry)

    def finish(self, ttft_s: float, itl_s: float, prompt: int, output: int, route: str = "disagg-remote") -> None:
        self.ttft.labels(route).observe(ttft_s)
        self.itl.labels(route).observe(itl_s)
        self.requests.labels("ok").inc()
        self.prompt.labels(route).inc(prompt)
        self.output.labels(route).inc(output)

    def sample(self, at_s: float) -> RouterSample:
        sample = RouterSample(at_s)
        parse_router_metrics(generate_latest(self.registry).decode(), sample)
        return sample


def test_quantile_interpolates_within_a_bucket():
    buckets = {0.1: 0.0, 1.0: 10.0, float("inf"): 10.0}
    assert histogram_quantile(buckets, 0.9) == pytest.approx(0.1 + 0.9 * 0.9)
    assert histogram_quantile({0.1: 0.0, float("inf"): 0.0}, 0.9) is None


def test_old_requests_leave_the_window_and_rates_are_taken_over_it():
    router, window = FakeRouter(), RouterWindow(window_s=10.0)
    window.add(router.sample(0.0))
    for _ in range(20):
        router.finish(ttft_s=4.0, itl_s=0.1, prompt=1000, output=10)  # slow, long prompts
    window.add(router.sample(5.0))
    slow = window.summarize([])
    assert slow.ttft_p90_s is not None and 2.5 < slow.ttft_p90_s <= 5.0
    assert slow.request_rate == pytest.approx(4.0) and slow.mean_prompt_tokens == pytest.approx(1000)
    for t in (10.0, 15.0, 20.0):  # only fast requests from now on
        for _ in range(10):
            router.finish(ttft_s=0.2, itl_s=0.015, prompt=100, output=200)
        window.add(router.sample(t))
    fast = window.summarize([])
    assert fast.ttft_p90_s is not None and fast.ttft_p90_s <= 0.5  # the slow burst is older than 10 s
    assert fast.itl_p90_s is not None and fast.itl_p90_s <= 0.02
    assert fast.request_rate == pytest.approx(2.0) and fast.mean_output_tokens == pytest.approx(200)
    assert fast.decode_tokens_per_s == pytest.approx(400.0)


def test_several_routers_add_up():
    a, b = FakeRouter(), FakeRouter()
    a.finish(1.0, 0.01, 10, 1)
    b.finish(1.0, 0.01, 30, 1)
    sample = RouterSample(0.0)
    for router in (a, b):
        parse_router_metrics(generate_latest(router.registry).decode(), sample)
    assert sample.counters["requests"] == 2 and sample.counters["prompt_tokens"] == 40
    assert sample.buckets["ttft"][float("inf")] == 2
