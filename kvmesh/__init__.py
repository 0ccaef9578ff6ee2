"""kvmesh: a distributed LLM inference mesh. The SDK is importable from here."""

from kvmesh.client import AsyncClient, Client, Completion, StreamChunk, Usage

__all__ = ["AsyncClient", "Client", "Completion", "StreamChunk", "Usage"]
