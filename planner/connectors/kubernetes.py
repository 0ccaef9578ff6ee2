"""The ``kubernetes`` connector: scales the ``prefill`` and ``decode`` Deployments of
``deploy/k8s/`` through the API server's ``scale`` subresource, with plain HTTPS requests (the
pod's service-account token and CA), so the planner needs no Kubernetes client library.

A pod's role is fixed by its Deployment's arguments, so a switch is one replica fewer in one
Deployment and one more in the other (the removed pod drains on SIGTERM, within its
``terminationGracePeriodSeconds``); add and remove change one Deployment by one replica
(Kubernetes, not the planner, picks which pod goes).
No cluster runs in CI: the tests point this connector at a fake API server and check the
requests it records.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from pathlib import Path

from kvmesh.config import PlannerSettings
from planner.policy import Decision

_TIMEOUT_S = 10.0


class KubernetesConnector:
    def __init__(self, settings: PlannerSettings) -> None:
        self._base = settings.k8s_api_url.rstrip("/")
        self._namespace = settings.k8s_namespace
        self._deployments = {"prefill": settings.prefill_deployment, "decode": settings.decode_deployment}
        token_file = Path(settings.k8s_token_file)
        self._token = token_file.read_text().strip() if token_file.is_file() else ""
        ca = settings.k8s_ca_file if settings.k8s_ca_file and Path(settings.k8s_ca_file).is_file() else None
        self._tls = ssl.create_default_context(cafile=ca) if self._base.startswith("https") else None

    def _url(self, role: str) -> str:
        return f"{self._base}/apis/apps/v1/namespaces/{self._namespace}/deployments/{self._deployments[role]}/scale"

    def _call(self, method: str, url: str, body: dict | None = None, content_type: str = "") -> dict:
        request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
        request.add_header("Accept", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S, context=self._tls) as response:
            return json.load(response)

    def replicas(self, role: str) -> int:
        return int(self._call("GET", self._url(role)).get("spec", {}).get("replicas", 0))

    def scale(self, role: str, delta: int) -> int:
        """Change ``role``'s Deployment by ``delta`` replicas (never below 0); the new count."""
        target = max(self.replicas(role) + delta, 0)
        self._call("PATCH", self._url(role), {"spec": {"replicas": target}}, "application/merge-patch+json")
        return target

    def _apply(self, decision: Decision) -> None:
        if decision.action == "switch":
            other = "decode" if decision.role == "prefill" else "prefill"
            count = len(decision.worker_ids) or 1
            self.scale(decision.role, +count)  # up first: capacity never dips below today's
            self.scale(other, -count)
        elif decision.action == "add":
            self.scale(decision.role, +1)
        elif decision.action == "remove":
            self.scale(decision.role, -(len(decision.worker_ids) or 1))
        else:
            raise ValueError(f"unknown action {decision.action!r}")

    async def apply(self, decision: Decision) -> None:
        await asyncio.to_thread(self._apply, decision)

    async def close(self) -> None:
        return None
