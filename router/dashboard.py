"""``GET /dashboard``: a live page served by the router itself (plain HTML/JS, no CDN, works
offline), and ``GET /dashboard/data``, the JSON it polls.

Figures come from the router's own memory (``RecentRequests``: the last requests' phase
timings, recent inter-token gaps, all-time counts) and its live view of the workers (their
stats streams), so the page needs neither Prometheus nor a trace collector; the planner's
decisions are read from etcd, where the planner publishes them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from router.request_trace import RecentRequests, RequestRecord

if TYPE_CHECKING:
    from router.pipeline import RouterCore

RECENT_SHOWN = 40
THROUGHPUT_WINDOW_S = 60.0
PLANNER_READ_TIMEOUT_S = 0.5


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds (None without samples)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {key: values[0] * 1000 for key in ("p50", "p90", "p99")}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49] * 1000, "p90": cuts[89] * 1000, "p99": cuts[98] * 1000}


def _summary(recent: RecentRequests, now: float) -> dict:
    done = [r for r in recent.records if r.status == "ok"]
    prompt = sum(r.prompt_tokens for r in done)
    window = [r for r in done if r.finished_unix >= now - THROUGHPUT_WINDOW_S]
    return {
        "total": sum(recent.by_route.values()),
        "by_route": dict(recent.by_route),
        "by_status": dict(recent.by_status),
        "ttft_ms": percentiles_ms([r.ttft_s for r in done]),
        "itl_ms": percentiles_ms(list(recent.itl_s)),
        "e2e_ms": percentiles_ms([r.e2e_s for r in done]),
        "cache_hit_rate": sum(r.cached_tokens for r in done) / prompt if prompt else None,
        "output_tokens_per_s": sum(r.output_tokens for r in window) / THROUGHPUT_WINDOW_S,
    }


def _workers(core: RouterCore) -> list[dict]:
    rows = []
    for state in sorted(core.pool.workers.values(), key=lambda s: s.worker_id):
        stats = state.stats
        rows.append({
            "id": state.worker_id, "role": state.info.role, "address": state.info.address,
            "running": stats.running_requests if stats else 0, "waiting": stats.waiting_requests if stats else 0,
            "kv_blocks_used": stats.kv_blocks_used if stats else 0,
            "kv_blocks_total": stats.kv_blocks_total if stats else state.info.capacity_blocks,
            "prefix_hit_rate": stats.prefix_hit_rate if stats else 0.0,
            "tokens_per_s": stats.tokens_per_s if stats else 0.0, "inflight": len(state.inflight),
        })  # fmt: skip
    return rows


def dashboard_data(core: RouterCore) -> dict:
    now = time.time()
    recent: list[RequestRecord] = list(core.recent.records)[-RECENT_SHOWN:]
    return {
        "now_unix": now,
        "router_mode": core.settings.router_mode,
        "kvstore_available": core.kv_index.available,
        "requests": _summary(core.recent, now),
        "workers": _workers(core),
        "recent": [asdict(record) for record in reversed(recent)],
    }


def add_dashboard_routes(app: FastAPI, core: RouterCore) -> None:
    page = resources.files("router").joinpath("dashboard.html").read_text()

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/dashboard/data")
    async def data() -> JSONResponse:
        return JSONResponse({**dashboard_data(core), "planner": await planner_decisions(core)})


async def planner_decisions(core: RouterCore) -> list[dict]:
    """The planner's recent decisions, as it published them in etcd ([] without a planner)."""
    from planner.decision_log import read_decisions

    try:
        return await asyncio.wait_for(read_decisions(core.pool.discovery), PLANNER_READ_TIMEOUT_S)
    except Exception:  # etcd slow or away: the page shows the rest
        return []
