"""The router's Prometheus metrics (served by the process's telemetry setup on /metrics).

``route`` is the path a request took, the value of its ``x-kvmesh-route`` header: kv,
round_robin, random, kv-load-only, disagg-remote, disagg-local (``none`` when it failed
before a worker was chosen); ``mode`` is the router's configured ``--router-mode``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

REQUESTS = Counter("kvmesh_router_requests_total", "Requests finished, by status, router mode and route path",
                   ["status", "mode", "route"])  # fmt: skip
ROUTING_DECISIONS = Counter("kvmesh_router_routing_decisions_total", "Workers chosen, by route path and worker",
                            ["route", "worker"])  # fmt: skip
TTFT = Histogram("kvmesh_router_ttft_seconds", "Time to first token at the router", ["route"], buckets=_LATENCY_BUCKETS)
ITL = Histogram("kvmesh_router_itl_seconds", "Inter-token latency at the router", ["route"], buckets=_ITL_BUCKETS)
E2E = Histogram("kvmesh_router_e2e_seconds", "Request latency, arrival to last token", ["route"],
                buckets=_LATENCY_BUCKETS)  # fmt: skip
OVERLAP_RATIO = Histogram("kvmesh_router_prefix_overlap_ratio",
                          "Cached prefix blocks on the chosen worker / prompt blocks, per routed request",
                          ["route"], buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1))  # fmt: skip
PROMPT_TOKENS = Counter("kvmesh_router_prompt_tokens_total", "Prompt tokens of finished requests", ["route"])
CACHED_TOKENS = Counter("kvmesh_router_cached_tokens_total", "Prompt tokens served from a prefix cache", ["route"])
OUTPUT_TOKENS = Counter("kvmesh_router_output_tokens_total", "Tokens streamed back", ["route"])
KV_ROUTING_DEGRADED = Gauge("kvmesh_router_kv_routing_degraded",
                            "1 while requests are routed on load alone because the KV index can't answer, "
                            "by reason (no_kvstore, kvstore_unreachable, registry_unavailable, timeout)",
                            ["reason"])  # fmt: skip
