"""KV export/import: a sequence's blocks as one raw tensor, moved between engines' pools.

``KvExport.data`` is ``[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]``, exactly
``kvmesh.v1.KvBlockChunk``'s layout; a worker slices it by layers/blocks into chunks and ships
``tensor_to_bytes`` of each (little-endian raw bytes, never pickle).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class KvExport:
    """The computed KV of a sequence's first ``num_tokens`` tokens, from block ``first_block`` on.

    ``data[:, :, i]`` and ``block_hashes[i]`` are block ``first_block + i`` (hash 0 for a
    trailing partial block, which has no name).
    """

    token_ids: list[int]
    num_tokens: int
    block_hashes: list[int]
    data: torch.Tensor
    first_block: int = 0

    @property
    def dtype(self) -> str:
        return str(self.data.dtype).removeprefix("torch.")

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]


def read_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """Copy the given pool blocks out to a CPU tensor [layers, 2, len(block_ids), ...].

    From a GPU the blocks are gathered on the device (one kernel at memory speed) and land in
    pinned host memory, so the device-to-host copy runs at full PCIe speed and the tensor's
    bytes go to the network without another copy."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    gathered = kv_cache.index_select(2, index)
    if not kv_cache.is_cuda:
        return gathered
    host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
    host.copy_(gathered, non_blocking=True)
    torch.cuda.current_stream(kv_cache.device).synchronize()
    return host


def write_blocks(kv_cache: torch.Tensor, block_ids: list[int], data: torch.Tensor) -> None:
    if data.shape[:2] != kv_cache.shape[:2] or data.shape[3:] != kv_cache.shape[3:] or data.shape[2] != len(
            block_ids):
        raise ValueError(f"KV data shape {tuple(data.shape)} does not fit this pool "
                         f"{tuple(kv_cache.shape[:2])}+[{len(block_ids)}]+{tuple(kv_cache.shape[3:])}")
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    if kv_cache.is_cuda and data.device.type == "cpu" and not data.is_pinned():
        # Bytes off the network sit in pageable memory; staging them through a pinned buffer
        # makes the upload one full-speed DMA instead of the driver's small bounce copies.
        data = data.pin_memory()
    kv_cache.index_copy_(2, index, data.to(device=kv_cache.device, dtype=kv_cache.dtype, non_blocking=True))


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a tensor (any dtype, bfloat16 included)."""
    assert sys.byteorder == "little"
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype!r}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(_DTYPES[dtype]).reshape(shape)
