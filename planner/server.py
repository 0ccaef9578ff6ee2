"""Planner process wiring: every ``--interval-s`` read the mesh (``metrics_source``), feed the
load predictor, let the policy decide, have the connector carry the decision out, and record
it (``decision_log``). Registered in etcd as kind ``planner`` like every service; its own
metrics (``kvmesh_planner_*``) on ``--metrics-port``.

The loop takes one decision at a time and waits for it to be carried out (a role switch
drains the worker first), so two decisions never overlap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

from kvmesh.config import PlannerSettings, load_settings
from kvmesh.discovery import Discovery
from kvmesh.grpc_service import ServiceProcess
from kvmesh.logging_setup import setup_logging
from planner.capacity import CapacityModel
from planner.connectors import Connector, DryRun
from planner.decision_log import DecisionLog
from planner.metrics_source import MetricsSource
from planner.policy import Policy, Targets
from planner.predictor import LoadPredictor
from services.engine.timing_model import TimingProfile

log = logging.getLogger(__name__)


def build_policy(settings: PlannerSettings) -> Policy:
    targets = Targets(settings.ttft_p90_ms / 1000, settings.itl_p90_ms / 1000, settings.hysteresis,
                      settings.cooldown_s, settings.min_workers, settings.max_workers)  # fmt: skip
    capacity = CapacityModel(TimingProfile.load(settings.profile), settings.target_utilization, targets.itl_p90_s,
                             settings.max_local_prefill_tokens, settings.prefill_chunk_tokens,
                             targets.ttft_p90_s)  # fmt: skip
    return Policy(targets, capacity)


def build_connector(settings: PlannerSettings, discovery: Discovery) -> Connector:
    if settings.dry_run:
        return DryRun()
    if settings.connector == "kubernetes":
        from planner.connectors.kubernetes import KubernetesConnector

        return KubernetesConnector(settings)
    from planner.connectors.local import LocalConnector

    return LocalConnector(settings, discovery)


class Planner:
    """The control loop, one ``step`` per interval."""

    def __init__(self, settings: PlannerSettings, discovery: Discovery, connector: Connector) -> None:
        self.settings = settings
        self.source = MetricsSource(discovery, settings.window_s)
        self.predictor = LoadPredictor(settings.smoothing, settings.trend)
        self.policy = build_policy(settings)
        self.connector = connector
        self.log = DecisionLog(discovery)

    async def step(self) -> None:
        window = await self.source.read()
        self.predictor.observe(window)
        # Size for the load one cooldown ahead: that is when the next decision can follow.
        forecast = self.predictor.forecast(max(self.settings.cooldown_s / self.settings.interval_s, 1.0))
        decision = self.policy.decide(window, forecast, time.monotonic())
        self.log.observe(self.policy.last_assessment)
        if decision is None:
            return
        decision = dataclasses.replace(decision, at_unix=time.time())
        outcome = "dry-run" if self.settings.dry_run else "done"
        try:
            await self.connector.apply(decision)
        except Exception as exc:
            outcome = f"failed: {exc}"
        await self.log.record(decision, outcome, self.settings.dry_run)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.step()
            except Exception:
                log.exception("planner step failed; trying again next interval")
            await asyncio.sleep(max(self.settings.interval_s - (time.monotonic() - started), 0.0))


async def serve(settings: PlannerSettings) -> None:
    process = ServiceProcess(settings, [])
    connector = build_connector(settings, process.discovery)
    planner = Planner(settings, process.discovery, connector)
    loop = asyncio.create_task(planner.run(), name="planner")
    try:
        await process.run_until_signal(process.instance_info())
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await connector.close()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(PlannerSettings, argv, prog="kvmesh planner")
    setup_logging(settings.log_level, "planner")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
