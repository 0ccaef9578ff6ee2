"""Where every decision goes: the log (with its reason), a Prometheus counter, a trace event,
and etcd (``/kvmesh/<ns>/planner/decisions``, the last few as JSON), which is how `kvmesh status`
and the router's dashboard show them without a connection to the planner."""

from __future__ import annotations

import json
import logging

from prometheus_client import Counter, Gauge

from kvmesh.discovery import Discovery
from kvmesh.telemetry import start_span
from planner.policy import Assessment, Decision

log = logging.getLogger(__name__)

KEPT = 20

DECISIONS = Counter("kvmesh_planner_decisions_total", "Decisions taken, by action, role and outcome",
                    ["action", "role", "outcome"])  # fmt: skip
POOL_WORKERS = Gauge("kvmesh_planner_pool_workers", "Workers registered per role at the last look", ["role"])
POOL_NEEDED = Gauge("kvmesh_planner_pool_needed_workers", "Workers the forecast load needs per role", ["role"])
LAST_DECISION = Gauge("kvmesh_planner_last_decision_unix", "When the last decision was taken (Unix seconds)")


def decisions_key(namespace: str) -> str:
    return f"/kvmesh/{namespace}/planner/decisions"


async def read_decisions(discovery: Discovery) -> list[dict]:
    """The planner's recent decisions, newest last ([] without a planner or on a bad value)."""
    found = await discovery.client.get(decisions_key(discovery.namespace).encode())
    if found is None:
        return []
    try:
        decisions = json.loads(found.value)
    except ValueError:
        return []
    return decisions if isinstance(decisions, list) else []


class DecisionLog:
    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery
        self.recent: list[dict] = []

    def observe(self, assessment: Assessment) -> None:
        for role, count in assessment.pools.items():
            POOL_WORKERS.labels(role).set(count)
            POOL_NEEDED.labels(role).set(min(assessment.need(role), 1e6))

    async def record(self, decision: Decision, outcome: str, dry_run: bool) -> None:
        """``outcome``: done, failed: <why>, or dry-run."""
        entry = {**decision.as_dict(), "outcome": outcome, "dry_run": dry_run}
        log.info("decision: %s %s%s — %s [%s]", decision.action, decision.role,
                 f" ({', '.join(decision.worker_ids)})" if decision.worker_ids else "", decision.reason,
                 outcome)  # fmt: skip
        DECISIONS.labels(decision.action, decision.role, outcome.split(":")[0]).inc()
        LAST_DECISION.set(decision.at_unix)
        span = start_span("planner.decision", attributes={"kvmesh.planner.action": decision.action,
                                                          "kvmesh.planner.role": decision.role,
                                                          "kvmesh.worker_ids": list(decision.worker_ids)})  # fmt: skip
        span.add_event("decision", {"reason": decision.reason, "outcome": outcome})
        span.end()
        self.recent = [*self.recent, entry][-KEPT:]
        try:
            await self._discovery.client.put(decisions_key(self._discovery.namespace).encode(),
                                             json.dumps(self.recent).encode())  # fmt: skip
        except Exception as exc:  # etcd away: the log and the metric still have it
            log.warning("cannot publish decision to etcd: %s", exc)
