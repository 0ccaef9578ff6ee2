"""Request migration: a worker SIGKILLed mid-stream; the router resumes the request on another
worker from the prompt plus the tokens already sent, and the client's greedy text is exactly
that of an unbroken run (no token repeated or missing)."""

from __future__ import annotations

import json
import os
import signal

import grpc
import httpx
import pytest

from kvmesh_proto.v1 import router_pb2, router_pb2_grpc
from services.engine.sampling_params import SamplingParams
from tests.e2e.test_routing import system_prompt

MAX_TOKENS = 96


def router_migrations(mesh) -> int:
    with grpc.insecure_channel(mesh.kv_grpc) as channel:
        return router_pb2_grpc.RouterStub(channel).Status(router_pb2.StatusRequest(), timeout=10).migrations


@pytest.mark.slow
@pytest.mark.timeout(900)  # starts a third worker: minutes on a loaded 2-core machine
async def test_sigkilled_worker_mid_stream_is_resumed_elsewhere_with_identical_text(mesh, engine, tokenizer):
    # A third worker first, so that two remain after one is killed (the later tests expect two).
    mesh.add_worker(7)
    mesh.stack.wait_router_workers(mesh.kv_http, 3, timeout_s=300)
    messages = [{"role": "system", "content": system_prompt("rivers", "migrate")},
                {"role": "user", "content": "Tell me about the Danube."}]  # fmt: skip
    prompt = tokenizer.encode_chat(messages)
    (expected,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    before = router_migrations(mesh)

    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    pieces, usage = [], None
    with httpx.Client(timeout=300) as client, client.stream("POST", f"{mesh.kv_http}/v1/chat/completions",
                                                            json=body) as response:  # fmt: skip
        assert response.status_code == 200
        doomed = mesh.child(response.headers["x-kvmesh-worker"])
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            if event["choices"]:
                pieces.append(event["choices"][0]["delta"].get("content", ""))
            usage = event.get("usage") or usage
            if len(pieces) == 3:  # tokens have reached the client: now the serving worker dies
                os.kill(doomed.proc.pid, signal.SIGSTOP)
                os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait()
    mesh.stack.children.remove(doomed)
    assert "".join(pieces) == tokenizer.decode(expected.new_token_ids)
    assert usage["completion_tokens"] == MAX_TOKENS
    assert router_migrations(mesh) == before + 1
    mesh.stack.wait_router_workers(mesh.kv_http, 2, timeout_s=60)
