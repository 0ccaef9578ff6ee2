"""The block-hash chain that names a KV-cache prefix everywhere in the mesh.

The router, every worker and the kvstore import this one module, so a hash names
the same 16 (``block_size``) tokens on every machine. A block is hashed only when
it is full: a partial block has no name and is never shared.

``hash_0 = xxh3_64(u32le(tokens_0))``;
``hash_i = xxh3_64(u64le(hash_{i-1}) || u32le(tokens_i))``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import xxhash

DEFAULT_BLOCK_SIZE = 16
MAX_TOKEN_ID = 2**32 - 1

_U64 = struct.Struct("<Q")


def block_hash(token_ids: Sequence[int], parent_hash: int | None) -> int:
    """Hash one full block, chained to the hash of the block before it (None for the first)."""
    payload = np.asarray(token_ids, dtype="<u4").tobytes()
    if parent_hash is not None:
        payload = _U64.pack(parent_hash) + payload
    return xxhash.xxh3_64_intdigest(payload, seed=0)


def block_hashes(
    token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, parent_hash: int | None = None
) -> list[int]:
    """Hashes of every full block of ``token_ids``; the trailing partial block is skipped.

    ``parent_hash`` continues an existing chain (e.g. extending a sequence's hashes
    as decode fills more blocks).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError("token ids must fit in an unsigned 32-bit integer")
    # One conversion, then byte slices: per-block numpy calls cost more than the hashing
    # (measured with `kvmesh bench router-scale`: this is most of a routing decision's CPU).
    data = tokens.astype("<u4").tobytes()
    step = block_size * 4
    hashes: list[int] = []
    parent = parent_hash
    digest, pack = xxhash.xxh3_64_intdigest, _U64.pack
    for start in range(0, len(tokens) // block_size * step, step):
        block = data[start : start + step]
        parent = digest(block if parent is None else pack(parent) + block, seed=0)
        hashes.append(parent)
    return hashes
