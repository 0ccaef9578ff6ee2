"""KV blocks on the wire: an engine's ``KvExport`` cut into checksummed ``KvBlockChunk``s and
put back together on the other side.

Raw little-endian tensor bytes with dtype, shape and block positions beside them, never
pickle: a receiver trusts nothing it cannot check, and a checksum mismatch or a shape that
does not add up is refused before a single byte reaches its KV pool.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import xxhash

from kvmesh_proto.v1 import transfer_pb2
from services.engine.kv_transfer import KvExport, tensor_from_bytes, tensor_to_bytes

DEFAULT_CHUNK_BLOCKS = 8


class TransferError(ValueError):
    """A chunk stream that cannot be imported (corrupt, out of order, incomplete)."""


def checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def export_to_chunks(
    export: KvExport, first_block: int, chunk_blocks: int, transfer_id: str, request_id: str, first_chunk_index: int = 0
) -> Iterator[transfer_pb2.KvBlockChunk]:
    """Blocks ``first_block..`` of the sequence (``export`` holds blocks ``export.first_block..``)
    as chunks of ``chunk_blocks`` blocks (all layers), numbered from ``first_chunk_index``.

    The caller sets the last chunk's ``last``, ``num_tokens`` and ``first_token``.
    """
    layers = export.data.shape[0]
    chunk_blocks = chunk_blocks or DEFAULT_CHUNK_BLOCKS
    end = export.first_block + export.num_blocks
    for index, start in enumerate(range(first_block, end, chunk_blocks), start=first_chunk_index):
        stop = min(start + chunk_blocks, end)
        part = export.data[:, :, start - export.first_block : stop - export.first_block]
        data = tensor_to_bytes(part)
        yield transfer_pb2.KvBlockChunk(
            transfer_id=transfer_id, request_id=request_id, chunk_index=index, layer_start=0, layer_count=layers,
            block_indices=range(start, stop), dtype=export.dtype, shape=list(part.shape), data=data,
            block_hashes=export.block_hashes[start - export.first_block : stop - export.first_block],
            checksum=checksum(data),
        )  # fmt: skip


class ChunkAssembler:
    """Collects one transfer's chunks, checking each as it arrives."""

    def __init__(self, first_block: int) -> None:
        self.first_block = first_block
        self.next_block = first_block
        self.parts: list[torch.Tensor] = []
        self.block_hashes: list[int] = []
        self.bytes_received = 0
        self.last: transfer_pb2.KvBlockChunk | None = None

    def add(self, chunk: transfer_pb2.KvBlockChunk) -> None:
        if checksum(chunk.data) != chunk.checksum:
            raise TransferError(f"chunk {chunk.chunk_index} of {chunk.request_id}: checksum mismatch")
        indices = list(chunk.block_indices)
        if indices and indices != list(range(self.next_block, self.next_block + len(indices))):
            raise TransferError(f"chunk {chunk.chunk_index}: blocks {indices[:3]}… out of order "
                                f"(expected {self.next_block})")  # fmt: skip
        if indices:
            shape = list(chunk.shape)
            if len(shape) != 6 or shape[2] != len(indices):
                raise TransferError(f"chunk {chunk.chunk_index}: shape {shape} does not match {len(indices)} blocks")
            try:
                self.parts.append(tensor_from_bytes(chunk.data, chunk.dtype, shape))
            except (ValueError, RuntimeError) as exc:
                raise TransferError(f"chunk {chunk.chunk_index}: {exc}") from exc
            self.block_hashes += list(chunk.block_hashes)
            self.next_block += len(indices)
        self.bytes_received += len(chunk.data)
        if chunk.last:
            self.last = chunk

    def kv(self, token_ids: list[int]) -> KvExport:
        """The received blocks as an export of blocks ``first_block..`` of ``token_ids``."""
        if self.last is None:
            raise TransferError("the transfer ended before its last chunk")
        num_tokens = self.last.num_tokens
        data = torch.cat(self.parts, dim=2) if self.parts else torch.empty(0)
        return KvExport(list(token_ids[:num_tokens]), num_tokens, self.block_hashes, data, self.first_block)
