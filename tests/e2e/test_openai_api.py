"""The OpenAI-compatible HTTP API through the real mesh, driven by the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from services.engine.sampling_params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.kv_http}/v1", api_key="unused", max_retries=0, timeout=120)


def engine_greedy(engine, token_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    (out,) = engine.generate([token_ids], SamplingParams(temperature=0, max_tokens=max_tokens))
    return out.new_token_ids, engine.tokenizer.decode(out.new_token_ids)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id.lower().startswith("smollm2")


def test_chat_completion_equals_in_process_engine(client, engine, tokenizer):
    reply = client.chat.completions.create(model="", messages=QUESTION, max_tokens=24, temperature=0)
    _, expected = engine_greedy(engine, tokenizer.encode_chat(QUESTION), 24)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(QUESTION))
    assert reply.usage.completion_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_gives_the_same_text(client):
    whole = client.chat.completions.create(model="", messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="", messages=QUESTION, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streaming_and_not(client, engine, tokenizer):
    prompt = "The three primary colors are"
    whole = client.completions.create(model="", prompt=prompt, max_tokens=16, temperature=0)
    _, expected = engine_greedy(engine, tokenizer.encode(prompt), 16)
    assert whole.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="", prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert streamed == expected


def test_stop_string_ends_the_text_before_it(client):
    reply = client.completions.create(model="", prompt="Count: 1, 2, 3, 4,", max_tokens=24, temperature=0, stop=["7"])
    assert "7" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_worker_header_and_cached_tokens_are_reported(mesh):
    # A prompt no other test sends, so only one worker can hold its blocks.
    messages = [{"role": "user", "content": "Describe the smell of rain on hot asphalt, for a perfumer."}]
    body = {"model": "", "messages": messages, "max_tokens": 4, "temperature": 0}
    first = httpx.post(f"{mesh.kv_http}/v1/chat/completions", json=body, timeout=60)
    second = httpx.post(f"{mesh.kv_http}/v1/chat/completions", json=body, timeout=60)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-kvmesh-worker"] in mesh.worker_ids()
    assert second.headers["x-kvmesh-worker"] == first.headers["x-kvmesh-worker"]
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 * (second.json()["usage"]["prompt_tokens"] // 16) - 16


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, "UTF-8"),
        ("/v1/chat/completions", {"model": "gpt-17", "messages": QUESTION}, 404, "not served"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 10**6}, 400, "context"),
        ("/v1/chat/completions", {"messages": QUESTION, "n": 2}, 400, "n=1"),
        ("/v1/chat/completions", {"messages": QUESTION, "top_p": 1.5}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x" * (10 * 1024 * 1024)}, 400, "bytes"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "token ids"),
        ("/v1/completions", {"prompt": ""}, 400, "empty"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_router_keeps_serving(mesh, path, body, status, needle):
    if isinstance(body, bytes):
        response = httpx.post(mesh.kv_http + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(mesh.kv_http + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"]
    assert error["type"]
    assert httpx.get(f"{mesh.kv_http}/health").status_code == 200
