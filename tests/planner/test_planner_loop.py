"""One planner step, in-process, on the session's etcd: the decision is published with its
outcome (dry run, done, failed), counted, and the cooldown holds the next one back."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from kvmesh.config import PlannerSettings
from kvmesh.discovery import Discovery
from planner.connectors import DryRun
from planner.decision_log import read_decisions
from planner.metrics_source import MetricWindow
from planner.policy import Decision
from planner.server import Planner, build_connector
from tests.planner.test_policy import window


class FixedSource:
    def __init__(self, metric_window: MetricWindow) -> None:
        self.window = metric_window

    async def read(self) -> MetricWindow:
        return self.window


class BrokenConnector(DryRun):
    async def apply(self, decision: Decision) -> None:
        raise ConnectionError("worker gone")


def _count(action: str, role: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("kvmesh_planner_decisions_total",
                                      {"action": action, "role": role, "outcome": outcome})  # fmt: skip
    return value or 0.0


def _planner(etcd_server, namespace: str, dry_run: bool, state_dir: Path) -> tuple[Planner, Discovery]:
    settings = PlannerSettings(etcd_endpoint=etcd_server.endpoint, namespace=namespace, dry_run=dry_run,
                               metrics_port=-1, cooldown_s=60.0, ttft_p90_ms=2000, itl_p90_ms=100,
                               state_dir=str(state_dir))  # fmt: skip
    discovery = Discovery(settings.etcd_endpoint, settings.namespace)
    planner = Planner(settings, discovery, build_connector(settings, discovery))
    planner.source = FixedSource(window(2, 4, ttft=5.0, itl=0.03, prefill_waiting=6))  # prefill short
    return planner, discovery


async def test_a_dry_run_publishes_its_decision_and_the_cooldown_holds_the_next(etcd_server, namespace, tmp_path):
    planner, discovery = _planner(etcd_server, namespace, dry_run=True, state_dir=tmp_path)
    before = _count("switch", "prefill", "dry-run")
    try:
        assert isinstance(planner.connector, DryRun)
        await planner.step()
        await planner.step()  # same shortage, within the cooldown
        decisions = await read_decisions(discovery)
    finally:
        await discovery.close()
    assert len(decisions) == 1
    assert (decisions[0]["action"], decisions[0]["role"], decisions[0]["outcome"]) == ("switch", "prefill", "dry-run")
    assert decisions[0]["dry_run"] and "TTFT p90" in decisions[0]["reason"] and decisions[0]["at_unix"] > 0
    assert _count("switch", "prefill", "dry-run") == before + 1


async def test_a_decision_the_connector_cannot_carry_out_is_recorded_as_failed(etcd_server, namespace, tmp_path):
    planner, discovery = _planner(etcd_server, namespace, dry_run=False, state_dir=tmp_path)
    await planner.connector.close()  # the local connector, replaced by one that fails
    planner.connector = BrokenConnector()
    try:
        await planner.step()
        decisions = await read_decisions(discovery)
    finally:
        await discovery.close()
    assert [d["outcome"] for d in decisions] == ["failed: worker gone"]
