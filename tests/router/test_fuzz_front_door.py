"""Fuzz of the router's two front doors against the real mesh's workers.

The router runs in-process (its FastAPI app through httpx's ASGI transport, its RouterCore for
gRPC GenerateRequests) over the session mesh's etcd and SmolLM2 workers, with max_output_tokens
2 so that the requests the fuzzer gets right finish at once. Whatever the body, field types or
sizes: a 2xx or 4xx with a well-formed body (an OpenAI error object for 4xx), never a 5xx, and
the router stays healthy.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh.config import RouterSettings
from kvmesh.discovery import Discovery
from kvmesh_proto.v1 import common_pb2, router_pb2
from router.errors import RouterError
from router.grpc_api import generation_input
from router.kv_index import KvIndexClient
from router.openai_api import create_app
from router.pipeline import RouterCore
from router.worker_pool import WorkerPool
from tests.fixtures.fuzz import fuzz_settings

# The caller's mistakes, or back-off; never the router's or a worker's failure.
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}  # fmt: skip


@pytest.fixture
async def core(mesh) -> AsyncIterator[RouterCore]:
    settings = RouterSettings(namespace=mesh.namespace, etcd_endpoint=mesh.etcd_endpoint, http_port=-1,
                              max_output_tokens=2, max_body_bytes=16384)  # fmt: skip
    discovery = Discovery(settings.etcd_endpoint, settings.namespace)
    pool, kv_index = WorkerPool(discovery), KvIndexClient(discovery, settings.kvstore_timeout_ms)
    await pool.start()
    await kv_index.start()
    while len(pool.workers) < 2:
        await asyncio.sleep(0.05)
    try:
        yield RouterCore(settings, pool, kv_index)
    finally:
        await kv_index.stop()
        await pool.stop()
        await discovery.close()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "tool", "pirate"]) | JSON,
    "content": st.text(max_size=60) | JSON | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                             "text": st.text(max_size=20)})),
})  # fmt: skip
FIELDS = {
    "model": st.just("") | JSON,
    "prompt": st.text(max_size=80) | st.lists(st.integers(-5, 60_000), max_size=20) | JSON,
    "messages": st.lists(MESSAGE, max_size=5) | JSON,
    "max_tokens": st.integers(-3, 5) | JSON,
    "max_completion_tokens": st.integers(-3, 5) | JSON,
    "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-1, 2) | JSON,
    "top_k": st.integers(-2, 100) | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | JSON,
    "logprobs": st.booleans() | st.integers(-1, 25) | JSON,
    "top_logprobs": st.integers(-1, 25) | JSON,
    "seed": st.integers(-1, 2**65) | JSON,
    "n": st.integers(0, 3) | JSON,
    "ignore_eos": st.booleans() | JSON,
}
BODIES = st.one_of(
    st.fixed_dictionaries({}, optional=FIELDS).map(lambda b: json.dumps(b).encode()),
    JSON.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=64),
    st.just(b'{"prompt": "' + b"x" * 20_000 + b'"}'),  # over max_body_bytes
)


def assert_well_formed(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            assert isinstance(json.loads(event), dict)
    else:
        assert response.json()["choices"]


@fuzz_settings(ci_examples=250)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=BODIES)
async def test_fuzz_http_bodies_get_2xx_or_4xx_never_5xx(core, path, body):
    transport = httpx.ASGITransport(app=create_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=60) as client:
        assert_well_formed(await client.post(path, content=body, headers={"content-type": "application/json"}))
        assert (await client.get("/health")).status_code == 200
    assert core.admission.inflight == 0  # every admitted request gave its slot back


FLOAT = st.floats(width=32) | st.sampled_from([0.0, 1.0, math.nan, math.inf])
SAMPLING = st.builds(
    common_pb2.SamplingParams, temperature=FLOAT, top_p=FLOAT, top_k=st.integers(-(2**31), 2**31 - 1),
    min_p=FLOAT, repetition_penalty=FLOAT, frequency_penalty=FLOAT, presence_penalty=FLOAT,
    max_tokens=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 3), stop=st.lists(st.text(max_size=300), max_size=18),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4), logprobs=st.integers(-5, 30),
    ignore_eos=st.booleans(),
)  # fmt: skip
CHAT = st.lists(st.builds(router_pb2.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "x", ""]),
                          content=st.text(max_size=40)), max_size=4)  # fmt: skip
INPUT = st.one_of(
    st.none(),
    st.text(max_size=80).map(lambda p: {"prompt": p}),
    CHAT.map(lambda m: {"chat": router_pb2.ChatMessages(messages=m)}),
    st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 1000), max_size=20).map(
        lambda t: {"tokens": router_pb2.TokenIds(token_ids=t)}),
)  # fmt: skip


@fuzz_settings(ci_examples=150)
@given(model=st.just("") | st.text(max_size=20), request_id=st.just("") | st.text(max_size=20), sampling=SAMPLING,
       inputs=INPUT)  # fmt: skip
async def test_fuzz_grpc_generate_requests_are_served_or_refused_precisely(core, model, request_id, sampling, inputs):
    request = router_pb2.GenerateRequest(model=model, sampling=sampling, **(inputs or {}))
    try:
        generation = await core.open(generation_input(request))
        chunks = [chunk async for chunk in generation.chunks()]
    except RouterError as exc:
        assert exc.code in CLIENT_CODES, exc
        assert exc.message
    else:
        assert chunks[-1].finish_reason
    assert core.admission.inflight == 0
