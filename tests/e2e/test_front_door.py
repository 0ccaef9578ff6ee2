"""The router's front doors with API keys, a per-key rate, an in-flight bound and size limits:
a router started with keys on the shared mesh, driven by the `openai` client, the kvmesh SDK
and raw HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import openai
import pytest

import kvmesh
from kvmesh.local_stores import free_port
from tests.e2e.test_cancellation import wait_idle

KEYS = ("key-alpha", "key-beta")
BURST = 8  # requests a key may send before its (very slow) rate refuses it


@dataclass
class KeyedRouter:
    http: str
    grpc: str


@pytest.fixture(scope="module")
def keyed(mesh) -> Iterator[KeyedRouter]:
    grpc_port, http_port = free_port(), free_port()
    env = {"KVMESH_API_KEYS": ",".join(KEYS), "KVMESH_API_KEY_RATE_LIMIT": "0.001",
           "KVMESH_API_KEY_BURST": str(BURST), "KVMESH_MAX_INFLIGHT_REQUESTS": "1", "KVMESH_MAX_MESSAGES": "4",
           "KVMESH_MAX_BODY_BYTES": "65536"}  # fmt: skip
    mesh.stack.spawn("router-keys", f"router-keys-{mesh.namespace}", "router.server",
                     ["--port", str(grpc_port), "--http-port", str(http_port)], env)  # fmt: skip
    child = mesh.stack.children[-1]
    try:
        mesh.stack.wait_router_workers(f"http://127.0.0.1:{http_port}", 2, timeout_s=300)
        yield KeyedRouter(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    finally:
        child.proc.terminate()
        child.proc.wait(30)
        mesh.stack.children.remove(child)


def openai_client(keyed: KeyedRouter, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{keyed.http}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": KEYS[0]}])
def test_http_without_a_valid_key_is_401_with_an_openai_error(keyed, headers):
    for path, body in (("/v1/models", None), ("/v1/completions", {"prompt": "hi", "max_tokens": 1})):
        r = httpx.request("POST" if body else "GET", keyed.http + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        error = r.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "unauthenticated" and error["message"]
    assert httpx.get(f"{keyed.http}/health", timeout=30).status_code == 200  # probes need no key


def test_openai_client_with_the_right_key_is_served_and_a_wrong_one_refused(keyed):
    reply = openai_client(keyed, KEYS[0]).completions.create(model="", prompt="Once upon", max_tokens=4)
    assert reply.choices[0].text and reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai_client(keyed, "not-a-key").completions.create(model="", prompt="Once upon", max_tokens=4)


def test_grpc_without_a_valid_key_is_unauthenticated_and_the_sdk_key_works(keyed):
    for key in (None, "wrong"):
        with kvmesh.Client(keyed.grpc, timeout=60, api_key=key) as client:
            for call in (lambda: client.generate("Hi", max_tokens=2), client.models):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with kvmesh.Client(keyed.grpc, timeout=60, api_key=KEYS[0]) as client:
        assert len(client.models()) == 1
        assert len(client.generate("Hello", max_tokens=3).token_ids) == 3


def test_a_key_past_its_rate_gets_429_with_retry_after(keyed):
    headers = {"authorization": f"Bearer {KEYS[1]}"}
    statuses = [httpx.post(f"{keyed.http}/v1/completions", json={}, headers=headers, timeout=30)
                for _ in range(BURST + 1)]  # fmt: skip
    assert [r.status_code for r in statuses] == [400] * BURST + [429]  # each within the burst is read (and refused)
    refused = statuses[-1]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    with kvmesh.Client(keyed.grpc, timeout=60, api_key=KEYS[1]) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("Hi", max_tokens=1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["retry-after"]


def test_size_limits_are_clear_4xx(keyed):
    headers = {"authorization": f"Bearer {KEYS[0]}"}
    many = [{"role": "user", "content": "hi"}] * 5
    r = httpx.post(f"{keyed.http}/v1/chat/completions", json={"messages": many}, headers=headers, timeout=30)
    assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]
    r = httpx.post(f"{keyed.http}/v1/completions", json={"prompt": "x" * 70_000}, headers=headers, timeout=30)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]


def test_beyond_the_inflight_bound_the_router_answers_429(keyed, mesh):
    wait_idle(mesh, 30)
    headers = {"authorization": f"Bearer {KEYS[0]}"}
    body = {"prompt": "Write a very long essay about rivers.", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=60, headers=headers) as client:
        with client.stream("POST", f"{keyed.http}/v1/completions", json=body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            first = next(lines)  # the first request is streaming: it holds the router's only slot
            assert '"text"' in first, first
            refused = client.post(f"{keyed.http}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert refused.status_code == 429, (refused.text, list(lines)[-3:])
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "resource_exhausted"
        # The held stream closed: its slot is free again (the router notices the hang-up).
        deadline = time.monotonic() + 30
        while (r := client.post(f"{keyed.http}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code \
                == 429 and time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.2)
        assert r.status_code == 200, r.text
