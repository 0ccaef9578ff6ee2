"""Engine failures as gRPC statuses, the same way in every worker service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from services.engine.async_engine import EngineDeadError, RequestEvicted
from services.engine.llm_engine import NoFreeBlocksError


@contextlib.asynccontextmanager
async def engine_errors_as_status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """No room in the pool → back off; engine gone → try elsewhere; bad input → fix it."""
    try:
        yield
    except NoFreeBlocksError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except (EngineDeadError, RequestEvicted) as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
