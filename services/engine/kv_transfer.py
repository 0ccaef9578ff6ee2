"""KV export/import: a sequence's blocks as one raw tensor, moved between engines' pools.

``KvExport.data`` is ``[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]``, exactly
``kvmesh.v1.KvBlockChunk``'s layout; a worker slices it by blocks into chunks and ships the
``block_rows`` of each (little-endian raw bytes, never pickle) without copying them first.
A receiver that knows what is coming holds pool blocks for it first (``KvReservation``) and
writes each chunk's bytes straight into them (``place_blocks``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
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


@dataclass
class KvReservation:
    """Pool blocks held for a sequence whose KV is being computed elsewhere (``Engine.reserve_kv``):
    blocks ``first_block..`` of the sequence are ``block_ids``, unnamed (nobody can match or read
    them) and owned by the reservation until the engine starts the sequence or releases them.

    Written from the transfer's threads while the engine steps other sequences: the blocks are
    nobody else's, and on a GPU the writes queue on the same stream as the engine's work."""

    first_block: int
    block_ids: list[int]
    num_tokens: int
    kv_cache: torch.Tensor

    @property
    def dtype(self) -> str:
        return str(self.kv_cache.dtype).removeprefix("torch.")

    def block_shape(self, blocks: int) -> list[int]:
        return band_shape(self.kv_cache, blocks)

    def write(self, offset: int, blocks: int, data: bytes | memoryview) -> None:
        """Blocks ``first_block + offset ..`` (``blocks`` of them) from their raw bytes."""
        place_blocks(self.kv_cache, self.block_ids[offset : offset + blocks], data)


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


def band_shape(kv_cache: torch.Tensor, blocks: int) -> list[int]:
    """The ``[layers, 2, blocks, ...]`` shape of ``blocks`` blocks of a pool."""
    shape = list(kv_cache.shape)
    return [*shape[:2], blocks, *shape[3:]]


def write_blocks(kv_cache: torch.Tensor, block_ids: list[int], data: torch.Tensor) -> None:
    if list(data.shape) != band_shape(kv_cache, len(block_ids)):
        raise ValueError(f"KV data shape {tuple(data.shape)} does not fit this pool's "
                         f"{tuple(band_shape(kv_cache, len(block_ids)))}")
    index = torch.tensor(block_ids, dtype=torch.long)
    if kv_cache.is_cuda:  # from pinned memory, so the upload queues instead of waiting for the device
        index = index.pin_memory().to(kv_cache.device, non_blocking=True)
    if kv_cache.is_cuda and data.device.type == "cpu" and not data.is_pinned():
        # Bytes off the network sit in pageable memory; staging them through a pinned buffer
        # makes the upload one full-speed DMA instead of the driver's small bounce copies.
        data = data.pin_memory()
    kv_cache.index_copy_(2, index, data.to(device=kv_cache.device, dtype=kv_cache.dtype, non_blocking=True))


def place_blocks(kv_cache: torch.Tensor, block_ids: list[int], data: bytes | memoryview) -> None:
    """Pool blocks ``block_ids`` from the raw bytes of ``[layers, 2, len(block_ids), ...]``.

    On CPU one copy, straight from the received bytes into the pool (memory the worker already
    touched: a fresh tensor per transfer cost more in page faults than the copy itself); on a
    GPU through a pinned staging tensor, then one upload."""
    if kv_cache.is_cuda:
        staging = torch.empty(band_shape(kv_cache, len(block_ids)), dtype=kv_cache.dtype, pin_memory=True)
        _copy_bytes(staging, data)
        write_blocks(kv_cache, block_ids, staging)
        return
    rows = kv_cache.view(torch.uint8).numpy()
    rows.shape = (kv_cache.shape[0] * kv_cache.shape[1], kv_cache.shape[2], -1)  # a view, or an error: never a copy
    src = np.frombuffer(data, dtype=np.uint8)
    if src.size != rows.shape[0] * len(block_ids) * rows.shape[2]:
        raise ValueError(f"{src.size} bytes do not fill {len(block_ids)} blocks of this pool")
    src = src.reshape(rows.shape[0], len(block_ids), rows.shape[2])
    first = block_ids[0] if block_ids else 0
    if block_ids == list(range(first, first + len(block_ids))):
        rows[:, first : first + len(block_ids)] = src  # a run of blocks: slices, no index arrays
    else:
        rows[:, block_ids] = src


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a tensor (any dtype, bfloat16 included), in one copy: a slice
    of blocks out of ``[layers, 2, blocks, ...]`` is gathered straight from its contiguous rows
    (``contiguous()`` then ``tobytes()`` would copy every byte twice)."""
    return b"".join(tensor_pieces(t))


def block_rows(part: torch.Tensor) -> np.ndarray:
    """The raw bytes of a band of blocks (``[layers, 2, blocks, ...]``, a slice along the blocks
    of a contiguous tensor) as a 2-D uint8 array with one contiguous row per (layer, K/V): a
    view, not a copy, so that a single numpy copy (which releases the GIL) gathers it."""
    assert sys.byteorder == "little"
    part = part.detach().cpu()
    if not part[0, 0].is_contiguous():
        part = part.contiguous()
    return part.view(torch.uint8).numpy().reshape(part.shape[0] * part.shape[1], -1)


def tensor_pieces(t: torch.Tensor) -> list[memoryview]:
    """The tensor's little-endian raw bytes as zero-copy views, in row-major order."""
    assert sys.byteorder == "little"
    return [memoryview(p.view(torch.uint8).numpy()) for p in _contiguous_pieces(t.detach().cpu())]


def _contiguous_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` as a row-major sequence of contiguous tensors (views, not copies, where it can)."""
    if t.is_contiguous():
        return [t.reshape(-1)]
    if t.dim() <= 1 or t.stride(-1) != 1:
        return [t.contiguous().reshape(-1)]
    return [piece for row in t.unbind(0) for piece in _contiguous_pieces(row)]


def tensor_from_bytes(data: bytes | memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor holding a copy of raw little-endian bytes (any buffer, read-only ones too)."""
    out = torch.empty(shape, dtype=dtype_of(dtype))
    _copy_bytes(out, data)
    return out


def _copy_bytes(out: torch.Tensor, data: bytes | memoryview) -> None:
    """Fill a contiguous CPU tensor with raw bytes, in one copy."""
    dst = out.view(torch.uint8).numpy() if out.dim() else out.reshape(1).view(torch.uint8).numpy()
    src = np.frombuffer(data, dtype=np.uint8)
    if src.size != dst.size:
        raise ValueError(f"{src.size} bytes do not fill a {out.dtype} tensor of shape {list(out.shape)}")
    dst[...] = src.reshape(dst.shape)


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {name!r}")
    return _DTYPES[name]
