"""KV events: what the engine tells the kvstore about the blocks it holds.

Each dataclass maps 1:1 onto ``kvmesh.v1.KvEvent`` (``BlockStored``, ``BlockRemoved``,
``AllCleared``); a callback receives them as ``(seq, events)`` batches, ``seq`` +1 per batch,
which maps onto ``KvEventBatch.seq``. The engine never imports protobuf: the worker converts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    """Full blocks that became available in the pool, in chain order."""

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    tier: int = 0


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks evicted from the pool (their hashes no longer name anything here)."""

    block_hashes: tuple[int, ...]
    tier: int = 0


@dataclass(frozen=True)
class AllCleared:
    """Every block was dropped (engine start, or the start of a full resync)."""


KvEvent = BlockStored | BlockRemoved | AllCleared
KvEventCallback = Callable[[int, list[KvEvent]], None]
