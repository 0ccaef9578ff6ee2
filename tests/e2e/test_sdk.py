"""The kvmesh SDK over the router's gRPC API."""

from __future__ import annotations

import grpc
import pytest

import kvmesh
from services.engine.sampling_params import SamplingParams

PROMPT = [{"role": "user", "content": "Name a fruit that is yellow."}]


def test_generate_and_stream_agree(mesh, engine, tokenizer):
    with kvmesh.Client(mesh.kv_grpc, timeout=120) as client:
        completion = client.generate(messages=PROMPT, max_tokens=12)
        chunks = list(client.stream(messages=PROMPT, max_tokens=12))
    (expected,) = engine.generate([tokenizer.encode_chat(PROMPT)], SamplingParams(temperature=0, max_tokens=12))
    assert completion.token_ids == expected.new_token_ids
    assert "".join(c.text for c in chunks) == completion.text
    assert completion.worker_id in mesh.worker_ids()
    assert completion.usage.completion_tokens == len(completion.token_ids)
    assert chunks[-1].finish_reason == completion.finish_reason


async def test_async_client(mesh):
    async with kvmesh.AsyncClient(mesh.kv_grpc, timeout=120) as client:
        assert len(await client.models()) == 1
        completion = await client.generate("Once upon a time", max_tokens=8)
        assert completion.text and len(completion.token_ids) == 8


def test_grpc_bad_input_has_precise_status(mesh):
    with kvmesh.Client(mesh.kv_grpc, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(messages=[{"role": "pirate", "content": "arr"}])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi", model="no-such-model")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            client.generate(token_ids=[1, 2, 10**8])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.generate("Hello", max_tokens=2).text is not None
