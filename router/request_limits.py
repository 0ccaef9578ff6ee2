"""Size limits on what a client may ask of the router, checked before any work is done.

Each limit is a router setting; a request over one is refused with INVALID_ARGUMENT (HTTP
400, or 413 for the body itself) naming the limit, so a client knows what to change.
"""

from __future__ import annotations

import grpc
from fastapi import Request

from kvmesh.config import RouterSettings
from router.errors import RouterError, invalid


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused as soon as it grows past ``max_bytes`` (never held whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(len(body), max_bytes)
    return bytes(body)


def _too_large(size: int, max_bytes: int) -> RouterError:
    return RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"the request body is at least {size} bytes; at most {max_bytes} are accepted",
                       http_status_code=413)  # fmt: skip


def check_input_limits(settings: RouterSettings, messages: list | None, token_ids: list | None) -> None:
    """Message count and pre-tokenized prompt length against the router's limits."""
    if messages is not None and len(messages) > settings.max_messages:
        raise invalid(f"{len(messages)} messages; at most {settings.max_messages} are accepted", "messages")
    if token_ids is not None and len(token_ids) > settings.max_prompt_tokens:
        raise invalid(f"the prompt has {len(token_ids)} tokens; at most {settings.max_prompt_tokens} are accepted",
                      "prompt")  # fmt: skip


def check_max_tokens(settings: RouterSettings, max_tokens: int) -> None:
    """max_tokens against the router's limit (checked after the model's context, whose message
    is the more useful one)."""
    if max_tokens > settings.max_output_tokens:
        raise invalid(f"max_tokens {max_tokens} is above this router's limit of {settings.max_output_tokens}",
                      "max_tokens")  # fmt: skip
