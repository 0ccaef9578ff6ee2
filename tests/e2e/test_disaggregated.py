"""Disaggregated serving on the real model: 1 prefill + 1 decode worker, KV pulled worker to worker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from kvmesh.grpc_service import mesh_channel
from kvmesh.launcher import LocalStack
from kvmesh.status import collect_status
from kvmesh_proto.v1 import worker_pb2, worker_pb2_grpc
from services.engine.sampling_params import SamplingParams
from tests.fixtures.mesh import disaggregated_stack

WORDS = [
    "harbor",
    "lantern",
    "copper",
    "meadow",
    "falcon",
    "quartz",
    "ember",
    "velvet",
    "granite",
    "orbit",
    "thunder",
    "compass",
]


def long_text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 5) % len(WORDS)] + str(i % 10) for i in range(words))


# Remote prefill from 64 uncached tokens on (default 256), so short prompts keep the suite fast.
LOCAL_PREFILL_TOKENS = "64"


@pytest.fixture(scope="module")
def disagg(etcd_server, redis_server, tmp_path_factory) -> Iterator[LocalStack]:
    # KVMESH_MAX_LOCAL_PREFILL_TOKENS is read by the router only.
    with disaggregated_stack(etcd_server, redis_server, tmp_path_factory.mktemp("disagg"),
                             {"KVMESH_MAX_LOCAL_PREFILL_TOKENS": LOCAL_PREFILL_TOKENS}) as stack:  # fmt: skip
        yield stack


def http(stack: LocalStack) -> str:
    return f"http://127.0.0.1:{stack.options.http_port}"


def complete(stack: LocalStack, prompt: str, max_tokens: int = 12, stream: bool = False) -> tuple[str, httpx.Headers]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        response = httpx.post(f"{http(stack)}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"], response.headers
    text = ""
    with httpx.stream("POST", f"{http(stack)}/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
        return text, response.headers


def decode_log(stack: LocalStack) -> str:
    return next(c for c in stack.children if c.name.startswith("decode")).log_path.read_text()


def expected(engine, tokenizer, prompt: str, max_tokens: int = 12) -> str:
    (out,) = engine.generate([tokenizer.encode(prompt)], SamplingParams(temperature=0, max_tokens=max_tokens))
    return tokenizer.decode(out.new_token_ids)


def test_long_prompt_is_prefilled_remotely_and_matches_aggregated(disagg, engine, tokenizer):
    prompt = long_text(1, 60)
    text, headers = complete(disagg, prompt)
    assert headers["x-kvmesh-route"] == "disagg-remote"
    assert headers["x-kvmesh-prefill-worker"].startswith("prefill-")
    assert headers["x-kvmesh-worker"].startswith("decode-")
    assert text == expected(engine, tokenizer, prompt)
    streamed, _ = complete(disagg, prompt + " again and again", stream=True)
    assert streamed == expected(engine, tokenizer, prompt + " again and again")


def test_prefix_cached_on_the_decode_side_is_not_sent_again(disagg, engine, tokenizer):
    shared = long_text(2, 60)
    first, _ = complete(disagg, shared)
    # The decode worker now holds `shared`; a long new suffix still goes to the prefill worker,
    # which sends only the blocks after the shared ones.
    extended = shared + " " + long_text(3, 60)
    text, headers = complete(disagg, extended)
    assert headers["x-kvmesh-route"] == "disagg-remote"
    assert text == expected(engine, tokenizer, extended)
    assert first == expected(engine, tokenizer, shared)
    pulls = [line for line in decode_log(disagg).splitlines() if "pulled" in line]
    already_here = int(pulls[-1].split("; ")[1].split()[0])
    assert already_here >= len(tokenizer.encode(shared)) // 16 - 1, pulls[-1]


def test_short_uncached_part_is_prefilled_on_the_decode_worker(disagg, engine, tokenizer):
    prompt = "The harbor at dawn was"
    text, headers = complete(disagg, prompt)
    assert headers["x-kvmesh-route"] == "disagg-local"
    assert text == expected(engine, tokenizer, prompt)


def test_prefill_worker_killed_mid_prefill_the_request_still_completes(disagg, engine, tokenizer):
    prompt = long_text(4, 500)
    result: dict[str, object] = {}

    def run() -> None:
        result["text"], result["headers"] = complete(disagg, prompt, max_tokens=8)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)  # the prefill worker is computing ~1,000 tokens
    prefill = next(c for c in disagg.children if c.name.startswith("prefill"))
    os.kill(prefill.proc.pid, signal.SIGKILL)
    thread.join(300)
    assert result["text"] == expected(engine, tokenizer, prompt, max_tokens=8)
    assert "prefilling locally" in decode_log(disagg)
    # Nothing the failed pull allocated stays held on the decode worker.
    stats = asyncio.run(decode_stats(disagg))
    assert stats.kv_blocks_used == 0, stats


async def decode_stats(stack: LocalStack) -> worker_pb2.WorkerStats:
    rows = await collect_status(stack.etcd_endpoint, stack.options.namespace)
    (row,) = [r for r in rows if r.get("role") == "decode"]
    async with mesh_channel(row["address"]) as channel:
        async for stats in worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.WorkerStatsRequest()):
            return stats
