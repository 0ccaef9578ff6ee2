"""One error type for everything the router refuses, carrying both its gRPC status and
its HTTP status and OpenAI error type, so the two front doors always agree."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc


@dataclass
class RouterError(Exception):
    code: grpc.StatusCode
    message: str
    param: str | None = None
    # For RESOURCE_EXHAUSTED: when a retry can succeed (HTTP Retry-After, gRPC trailing metadata).
    retry_after_s: float | None = None
    # When HTTP has a more precise status than the gRPC code's (413 for a body too large).
    http_status_code: int | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        return self.http_status_code or _HTTP_STATUS.get(self.code, 500)

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPE.get(self.code, "server_error")

    def openai_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.param,
                "code": self.code.name.lower(),
            }
        }


_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_OPENAI_TYPE = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
    grpc.StatusCode.OUT_OF_RANGE: "invalid_request_error",
    grpc.StatusCode.NOT_FOUND: "invalid_request_error",
    grpc.StatusCode.UNAUTHENTICATED: "authentication_error",
    grpc.StatusCode.PERMISSION_DENIED: "permission_error",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_error",
}


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; never 0, so a client cannot spin."""
    return str(max(1, math.ceil(seconds)))


def exhausted(message: str, retry_after_s: float) -> RouterError:
    return RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=retry_after_s)


def invalid(message: str, param: str | None = None) -> RouterError:
    return RouterError(grpc.StatusCode.INVALID_ARGUMENT, message, param)
