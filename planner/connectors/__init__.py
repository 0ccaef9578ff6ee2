"""Who carries out a decision: ``local`` (worker processes on this machine, roles switched over
gRPC), ``kubernetes`` (the prefill / decode Deployments' replica counts), or nobody (``--dry-run``)."""

from __future__ import annotations

from typing import Protocol

from planner.policy import Decision


class Connector(Protocol):
    async def apply(self, decision: Decision) -> None:
        """Carry ``decision`` out; raise on failure (the planner records it as failed)."""

    async def close(self) -> None: ...


class DryRun:
    """Decisions are only reported (logged, exported, published)."""

    async def apply(self, decision: Decision) -> None:
        return None

    async def close(self) -> None:
        return None
