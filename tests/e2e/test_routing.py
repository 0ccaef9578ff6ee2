"""KV-aware routing on the real mesh: prefix affinity, kv vs round-robin, load, a dead worker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import httpx

from kvmesh.status import collect_status
from kvmesh_proto.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc, worker_pb2, worker_pb2_grpc

TOPICS = ["astronomy", "baking bread", "medieval history", "jazz piano", "sailing", "chess openings",
          "beekeeping", "volcanoes", "origami", "tax law", "mountain birds", "espresso"]  # fmt: skip


def system_prompt(topic: str, variant: str) -> str:
    """A long (~220 token) system prompt, distinct per topic and variant."""
    return (f"[{variant}] You are a patient expert tutor on {topic}. " * 3
            + f"Always answer questions about {topic} with one precise sentence, cite a classic "
              f"reference work on {topic}, avoid jargon, and never discuss anything except {topic}. " * 5)


def chat(http: str, system: str, question: str, max_tokens: int = 2) -> httpx.Response:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    response = httpx.post(f"{http}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def cached(response: httpx.Response) -> int:
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_shared_prefix_goes_to_the_worker_that_holds_it(mesh):
    system = system_prompt("glaciers", "affinity")
    first = chat(mesh.kv_http, system, "How do glaciers move?")
    second = chat(mesh.kv_http, system, "Why are glaciers blue?")
    assert second.headers["x-kvmesh-worker"] == first.headers["x-kvmesh-worker"]
    usage = second.json()["usage"]
    assert cached(second) >= usage["prompt_tokens"] - 32, usage


def total_cached(http: str, variant: str) -> int:
    """Eight long system prompts, each asked twice; the second round in a rotated order,
    so a router blind to the cache sends each repeat to the other worker."""
    topics = TOPICS[:8]
    for topic in topics:
        chat(http, system_prompt(topic, variant), "Give me one fact.")
    rotated = topics[1:] + topics[:1]
    return sum(cached(chat(http, system_prompt(t, variant), "Give me another fact.")) for t in rotated)


def test_kv_routing_reuses_far_more_cache_than_round_robin(mesh):
    round_robin = total_cached(mesh.rr_http, "rr")
    kv = total_cached(mesh.kv_http, "kv")
    assert kv >= 8 * 160, f"kv mode cached only {kv} tokens of eight ~220-token system prompts"
    assert kv > 3 * round_robin + 100, f"kv {kv} vs round_robin {round_robin}"


def test_busy_worker_does_not_receive_every_new_request(mesh):
    """One worker decodes a long answer; fresh prompts (no cached prefix) go elsewhere."""
    busy: dict[str, str] = {}

    def long_generation() -> None:
        body = {"prompt": system_prompt("long story", "busy") + " Tell a very long story.", "max_tokens": 200,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{mesh.kv_http}/v1/completions", json=body, timeout=300)
        busy["worker"] = response.headers["x-kvmesh-worker"]

    thread = threading.Thread(target=long_generation)
    thread.start()
    time.sleep(3.0)  # the long request is decoding and its worker's stats show it
    chosen = [chat(mesh.kv_http, system_prompt(t, "fresh"), "Hi").headers["x-kvmesh-worker"] for t in TOPICS[8:]]
    thread.join()
    assert chosen.count(busy["worker"]) < len(chosen), (busy, chosen)


async def kvstore_workers(address: str) -> dict[str, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stats = await kvstore_pb2_grpc.KvStoreStub(channel).Stats(kvstore_pb2.KvStoreStatsRequest())
    return {w.worker_id: w.blocks for w in stats.workers}


async def test_sigkilled_worker_stops_receiving_requests_and_leaves_the_index(mesh, tokenizer):
    doomed = mesh.add_worker(9)
    mesh.stack.wait_router_workers(mesh.kv_http, 3, timeout_s=180)
    rows = {r["id"]: r for r in await collect_status(mesh.etcd_endpoint, mesh.namespace)}
    kvstore_address = rows[f"kvstore-{mesh.namespace}"]["address"]

    # Warm a long prompt on the new worker directly; the router must then send it there.
    system = system_prompt("doomed topic", "kill")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}]
    async with grpc.aio.insecure_channel(rows[doomed]["address"]) as channel:
        warm = worker_pb2.WorkerGenerateRequest(request_id="warm", token_ids=tokenizer.encode_chat(messages),
                                                sampling=common_pb2.SamplingParams(max_tokens=1))  # fmt: skip
        _ = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(warm)]
    deadline = time.monotonic() + 5
    while (await kvstore_workers(kvstore_address)).get(doomed, 0) < 10:
        assert time.monotonic() < deadline, "the worker's KV events never reached the index"
        await asyncio.sleep(0.1)
    assert chat(mesh.kv_http, system, "Hello?").headers["x-kvmesh-worker"] == doomed

    os.kill(mesh.child(doomed).proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    mesh.stack.wait_router_workers(mesh.kv_http, 2, timeout_s=10)
    assert time.monotonic() - killed < 3 + 1.5  # lease TTL 3 s, plus the router's poll
    for _ in range(3):
        assert chat(mesh.kv_http, system, "Still there?").headers["x-kvmesh-worker"] != doomed
    assert doomed not in await kvstore_workers(kvstore_address)
