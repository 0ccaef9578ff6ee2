"""The kubernetes connector against a fake API server that records its requests (no cluster
runs here): a switch scales one Deployment up, then the other down, through ``/scale``."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvmesh.config import PlannerSettings
from planner.connectors.kubernetes import KubernetesConnector
from planner.policy import Decision

SCALE = "/apis/apps/v1/namespaces/kv/deployments/{}/scale"


class FakeApiServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replicas = {"prefill": 2, "decode": 3}
        self.requests: list[tuple[str, str, str, dict | None]] = []  # method, path, auth, body


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def _deployment(self) -> str | None:
        return next((name for name in self.server.replicas if self.path == SCALE.format(name)), None)

    def _reply(self, name: str) -> None:
        body = json.dumps({"kind": "Scale", "spec": {"replicas": self.server.replicas[name]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        name = self._deployment()
        self.server.requests.append(("GET", self.path, self.headers.get("Authorization", ""), None))
        if name is None:
            self.send_error(404)
            return
        self._reply(name)

    def do_PATCH(self) -> None:
        name = self._deployment()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("PATCH", self.path, self.headers.get("Content-Type", ""), body))
        if name is None:
            self.send_error(404)
            return
        self.server.replicas[name] = body["spec"]["replicas"]
        self._reply(name)

    def log_message(self, *args: object) -> None:
        return None


@contextlib.contextmanager
def serving(server: FakeApiServer) -> Iterator[FakeApiServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with serving(FakeApiServer()) as server:
        yield server


@pytest.fixture
def connector(api: FakeApiServer, tmp_path) -> KubernetesConnector:
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    settings = PlannerSettings(connector="kubernetes", k8s_api_url=f"http://127.0.0.1:{api.server_port}",
                               k8s_namespace="kv", k8s_token_file=str(token), k8s_ca_file="")  # fmt: skip
    return KubernetesConnector(settings)


async def test_a_switch_to_prefill_scales_prefill_up_then_decode_down(api, connector):
    await connector.apply(Decision("switch", "prefill", "TTFT over target", ("decode-x",)))
    patches = [(path, body) for method, path, _, body in api.requests if method == "PATCH"]
    assert patches == [(SCALE.format("prefill"), {"spec": {"replicas": 3}}),
                       (SCALE.format("decode"), {"spec": {"replicas": 2}})]  # fmt: skip
    assert all(auth == "Bearer secret-token" for method, _, auth, _ in api.requests if method == "GET")
    assert all(ctype == "application/merge-patch+json" for method, _, ctype, _ in api.requests if method == "PATCH")


async def test_add_and_remove_change_one_deployment_by_one(api, connector):
    await connector.apply(Decision("add", "decode", "ITL over target"))
    await connector.apply(Decision("remove", "prefill", "idle", ("prefill-y",)))
    assert api.replicas == {"prefill": 1, "decode": 4}


async def test_an_api_error_fails_the_decision(api, connector, tmp_path):
    settings = PlannerSettings(connector="kubernetes", k8s_api_url=f"http://127.0.0.1:{api.server_port}",
                               k8s_namespace="kv", decode_deployment="missing", k8s_token_file=str(tmp_path / "none"),
                               k8s_ca_file="")  # fmt: skip
    with pytest.raises(OSError):
        await KubernetesConnector(settings).apply(Decision("add", "decode", "ITL over target"))
