"""The receiving side of a KV transfer: ``PullBlocks`` streams read, every chunk checked, and
its blocks written into place (a decode worker's reserved pool blocks) or kept (a peer fetch).

Pulled over one or several parallel gRPC streams or TCP connections (``receive_into``,
``kv_tcp.py``); each message parsed without copying its payload (``decode_chunk``); chunks
checked and placed in worker threads as they arrive, in any order (``ChunkAssembler``). The
format is ``kv_wire.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import grpc
import torch
from google.protobuf.message import DecodeError

from kvmesh.grpc_service import mesh_channel
from kvmesh.telemetry import outgoing_metadata
from kvmesh_proto.v1 import transfer_pb2
from services.engine.kv_transfer import KvExport, KvReservation, dtype_of, place_blocks
from services.worker.kv_tcp import TOKEN_BYTES, receive_tcp
from services.worker.kv_wire import DATA_FIELD, PULL_BLOCKS_METHOD, TransferError, checksum, read_varint


def pull_blocks(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    """``KvTransfer.PullBlocks`` on ``channel``, yielding ``decode_chunk``'s (chunk, data) pairs."""
    return channel.unary_stream(PULL_BLOCKS_METHOD, request_serializer=transfer_pb2.PullBlocksRequest.SerializeToString,
                                response_deserializer=decode_chunk)  # fmt: skip


class Arrival(NamedTuple):
    """How a transfer came: when its first chunk arrived (``time.monotonic``, None if none did),
    that chunk's size, and on what (``"tcp"`` connections or ``"grpc"`` streams)."""

    first_at: float | None
    first_bytes: int
    transport: str


async def receive_into(assembler: ChunkAssembler, address: str, pull: transfer_pb2.PullBlocksRequest,
                       timeout_s: float) -> Arrival:
    """Stream ``pull`` from the worker at ``address`` into ``assembler``, every chunk checked as it
    arrives, over ``pull.streams`` parallel calls (each on its own connection) or, with
    ``pull.tcp_connections`` and a sender that offers it, that many TCP connections beside one
    call (``Arrival`` says which). A failure of any stream or connection fails the whole transfer
    and cancels the others."""
    streams = max(1, pull.streams)
    first: list[tuple[float, int]] = []
    transport = ["grpc"]
    deadline = time.monotonic() + timeout_s
    name = pull.request_id or pull.transfer_id

    async def add(chunk: transfer_pb2.KvBlockChunk, data: memoryview) -> None:
        if not first:
            first.append((time.monotonic(), len(data)))
        await assembler.add_off_loop(chunk, data)

    async def on_frame(message: memoryview) -> None:
        try:
            chunk, data = decode_chunk(message)
        except DecodeError as exc:
            raise TransferError(f"{name}: a frame on a data connection is not a KvBlockChunk ({exc})") from exc
        await add(chunk, data)

    async def over_tcp(offer: transfer_pb2.KvBlockChunk) -> None:
        """The chunks on the TCP connections the sender offered (``kv_tcp.py``), within the
        pull's own deadline, as its gRPC calls are."""
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await all_or_nothing([receive_tcp(address, offer.data_port, offer.data_token, index, on_frame)
                                      for index in range(pull.tcp_connections)])  # fmt: skip
        except TimeoutError as exc:
            raise TransferError(f"{name}: not received within {timeout_s}s") from exc

    async def receive(index: int, channel: grpc.aio.Channel) -> None:
        request = pull if index == 0 else transfer_pb2.PullBlocksRequest(
            transfer_id=pull.transfer_id, request_id=pull.request_id, streams=streams, stream_index=index)
        messages, offered = 0, False
        async for received in pull_blocks(channel)(request, timeout=timeout_s, metadata=outgoing_metadata()):
            if received is None:  # gRPC logs a message decode_chunk refused and hands on None
                raise TransferError(f"{name}: a message on stream {index} is not a KvBlockChunk")
            chunk, data = received
            messages += 1
            if offered:
                raise TransferError(f"{name}: a message on the call after its data port offer")
            if chunk.data_port or chunk.data_token:
                check_offer(chunk, pull, messages)
                offered, transport[0] = True, "tcp"
                await over_tcp(chunk)
            else:
                await add(chunk, data)

    try:
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(mesh_channel(address, own_connection=streams > 1))
                        for _ in range(streams)]  # fmt: skip
            await all_or_nothing([receive(index, channel) for index, channel in enumerate(channels)])
    finally:
        await assembler.settle()
    assembler.check_complete()
    return Arrival(*(first[0] if first else (None, 0)), transport[0])


def spread(connections: int, tcp: bool) -> dict[str, int]:
    """A ``PullBlocksRequest``'s fields for a transfer spread over ``connections`` TCP connections
    beside its one call or, without ``tcp``, over as many gRPC streams (over TCP, ``streams``
    stays 1, so a sender that does not offer TCP answers on that call)."""
    return {"streams": 1, "tcp_connections": connections} if tcp else {"streams": connections}


def check_offer(offer: transfer_pb2.KvBlockChunk, pull: transfer_pb2.PullBlocksRequest, position: int) -> None:
    """A data port offer must answer a pull that asked for one, come first and carry nothing else."""
    if not pull.tcp_connections or position != 1 or offer.block_indices or offer.last \
            or len(offer.data_token) != TOKEN_BYTES or not 0 < offer.data_port < 65536:
        raise TransferError(f"{pull.request_id or pull.transfer_id}: an unasked or malformed data port offer "
                            f"(message {position}, port {offer.data_port})")  # fmt: skip


async def all_or_nothing(calls: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``calls`` concurrently; the first failure cancels the rest and is raised as it is."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# The receiving side's own parse of ``KvBlockChunk`` (same bytes on the wire, any protobuf
# encoder may have written them): the generated parser would copy ``data`` into the message
# and again into every ``chunk.data`` read; here it stays a view into gRPC's message bytes.
def decode_chunk(message: bytes | memoryview) -> tuple[transfer_pb2.KvBlockChunk, memoryview]:
    """gRPC response deserializer for ``PullBlocks`` (and the parse of a TCP data frame): the
    chunk without ``data`` (every other field parsed by protobuf) and ``data`` as a zero-copy
    view of ``message``."""
    view = memoryview(message)
    data_spans: list[tuple[int, int, int]] = []  # (field start, bytes start, bytes end)
    pos = 0
    try:
        while pos < len(message):
            start = pos
            key, pos = read_varint(message, pos)
            wire_type = key & 7
            if wire_type == 0:
                pos = read_varint(message, pos)[1]
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, pos = read_varint(message, pos)
                if key >> 3 == DATA_FIELD:
                    data_spans.append((start, pos, pos + length))
                pos += length
            else:
                raise DecodeError(f"unexpected wire type {wire_type}")
    except IndexError:
        pos = len(message) + 1
    if pos != len(message):
        raise DecodeError("truncated KvBlockChunk")
    cuts = [0] + [edge for start, _, end in data_spans for edge in (start, end)] + [len(message)]
    header_bytes = b"".join(view[a:b] for a, b in zip(cuts[::2], cuts[1::2], strict=True))
    header = transfer_pb2.KvBlockChunk.FromString(header_bytes)
    data = view[data_spans[-1][1] : data_spans[-1][2]] if data_spans else view[:0]  # the last one wins
    return header, data


class ChunkAssembler:
    """Collects one transfer's chunks, checking each as it arrives.

    Chunks may come in any order (a transfer spread over several streams interleaves them);
    ``check_complete`` refuses a transfer whose blocks do not tile ``first_block..`` without a
    gap or an overlap. With ``into`` (a disaggregated prefill: the decode worker reserved pool
    blocks for the prompt before pulling), each chunk is written straight into those blocks as
    it arrives, off the event loop, overlapping the rest of the transfer; otherwise (a peer
    fetch) a chunk's bytes are kept as they came off the wire (a view into the gRPC message, see
    ``decode_chunk``) and copied once, by ``kv()``.
    """

    def __init__(self, first_block: int, into: KvReservation | None = None) -> None:
        self.first_block = first_block
        self.into = into
        self.blocks_received = 0
        # first block → (blocks, their bytes unless already written ``into`` the pool, their hashes)
        self.parts: dict[int, tuple[int, bytes | memoryview | None, list[int]]] = {}
        self.shape: list[int] | None = None  # of the blocks received so far
        self.dtype = ""
        self.bytes_received = 0
        self.last: transfer_pb2.KvBlockChunk | None = None
        self._writing: set[asyncio.Future] = set()

    def add(self, chunk: transfer_pb2.KvBlockChunk, data: bytes | memoryview | None = None) -> None:
        """Check and keep ``chunk``; ``data`` stands for ``chunk.data`` when the bytes were
        left out of the message object (``decode_chunk``). Bookkeeping comes first: a chunk
        that fails its checksum fails the whole transfer anyway, and none of its bytes reach
        the pool."""
        data = chunk.data if data is None else data
        self._verify_and_write(chunk, data, self.keep(chunk, data))

    async def add_off_loop(self, chunk: transfer_pb2.KvBlockChunk, data: bytes | memoryview) -> None:
        """``add`` with the checksum and the copy in one trip to a worker thread (both release
        the GIL), so the event loop reads the next chunks meanwhile; bookkeeping stays on the
        loop. The thread's work is shielded: cancelling the caller cannot stop a running
        thread, so ``settle`` must still see it."""
        placement = self.keep(chunk, data)
        work = asyncio.get_running_loop().run_in_executor(None, self._verify_and_write, chunk, data, placement)
        self._writing.add(work)
        work.add_done_callback(_finished_writing(self._writing))
        await asyncio.shield(work)

    def _verify_and_write(self, chunk: transfer_pb2.KvBlockChunk, data: bytes | memoryview,
                          placement: tuple[int, int, memoryview] | None) -> None:  # fmt: skip
        self.verify(chunk, data)
        if placement is not None:
            self.into.write(*placement)

    async def settle(self) -> None:
        """Wait for the checks and writes still running in threads, even when cancelled meanwhile
        (then re-raised): a failed or cancelled transfer's threads run on, and its reserved
        blocks must not be retried, freed or reused under them."""
        cancelled = False
        while self._writing:
            try:
                await asyncio.wait(list(self._writing))
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    @staticmethod
    def verify(chunk: transfer_pb2.KvBlockChunk, data: bytes | memoryview) -> None:
        if checksum(data) != chunk.checksum:
            raise TransferError(f"chunk {chunk.chunk_index} of {chunk.request_id}: checksum mismatch")

    def keep(self, chunk: transfer_pb2.KvBlockChunk, data: bytes | memoryview) -> tuple[int, int, memoryview] | None:
        """Record a verified chunk; returns what to write ``into`` the pool (None: nothing)."""
        indices = list(chunk.block_indices)
        placement = None
        if indices:
            start = indices[0]
            if start < self.first_block or start in self.parts or indices != list(range(start, start + len(indices))):
                raise TransferError(f"chunk {chunk.chunk_index}: blocks {indices[:3]}… are not a new run of blocks "
                                    f"from {self.first_block} on")  # fmt: skip
            if self.into is not None and start + len(indices) > self.first_block + len(self.into.block_ids):
                raise TransferError(f"chunk {chunk.chunk_index}: blocks beyond the {len(self.into.block_ids)} "
                                    "reserved")  # fmt: skip
            self._check_layout(chunk, len(indices), len(data))
            placement = (start - self.first_block, len(indices), data) if self.into is not None else None
            self.parts[start] = (len(indices), None if placement else data, list(chunk.block_hashes))
            self.blocks_received += len(indices)
        self.bytes_received += len(data)
        if chunk.last:
            if self.last is not None:
                raise TransferError(f"chunk {chunk.chunk_index}: a second last chunk")
            self.last = chunk
        return placement

    def _check_layout(self, chunk: transfer_pb2.KvBlockChunk, blocks: int, size: int) -> None:
        """Shape, dtype and size agree with the block count, with the chunks before and with
        the pool blocks they go into."""
        shape = list(chunk.shape)
        if len(shape) != 6 or shape[2] != blocks:
            raise TransferError(f"chunk {chunk.chunk_index}: shape {shape} does not match {blocks} blocks")
        try:
            itemsize = dtype_of(chunk.dtype).itemsize
        except ValueError as exc:
            raise TransferError(f"chunk {chunk.chunk_index}: {exc}") from exc
        if size != math.prod(shape) * itemsize:
            raise TransferError(f"chunk {chunk.chunk_index}: {size} bytes do not fill {chunk.dtype} {shape}")
        if self.into is not None and (shape != self.into.block_shape(blocks) or chunk.dtype != self.into.dtype):
            raise TransferError(f"chunk {chunk.chunk_index}: {chunk.dtype} {shape} does not fit this pool's "
                                f"{self.into.dtype} {self.into.block_shape(blocks)}")  # fmt: skip
        if self.shape is None:
            self.shape, self.dtype = shape, chunk.dtype
        elif shape[:2] + shape[3:] != self.shape[:2] + self.shape[3:] or chunk.dtype != self.dtype:
            raise TransferError(f"chunk {chunk.chunk_index}: {chunk.dtype} {shape} does not match the chunks "
                                f"before ({self.dtype} {self.shape})")  # fmt: skip
        else:
            self.shape[2] += blocks

    def check_complete(self) -> list[tuple[int, bytes | memoryview, list[int]]]:
        """The parts by block, checked to tile ``first_block..``, to end with the last chunk's
        and, ``into`` a reservation, to fill it."""
        if self.last is None:
            raise TransferError("the transfer ended before its last chunk")
        expected = self.first_block
        for start in sorted(self.parts):
            if start != expected:
                raise TransferError(f"blocks {expected}..{start - 1} are missing from the transfer")
            expected += self.parts[start][0]
        last_blocks = list(self.last.block_indices)
        if last_blocks and last_blocks[-1] + 1 != expected:
            raise TransferError(f"blocks {last_blocks[-1] + 1}..{expected - 1} came after the last chunk's")
        if self.into is not None and (self.blocks_received, self.last.num_tokens) != (
                len(self.into.block_ids), self.into.num_tokens):
            raise TransferError(f"{self.blocks_received} blocks of {self.last.num_tokens} tokens came for the "
                                f"{len(self.into.block_ids)} blocks of {self.into.num_tokens} reserved")  # fmt: skip
        return [self.parts[start] for start in sorted(self.parts)]

    def kv(self, token_ids: list[int]) -> KvExport:
        """The received blocks (kept, not written ``into`` a pool) as an export of blocks
        ``first_block..`` of ``token_ids``."""
        assert self.into is None, "the blocks went into the pool"
        parts = self.check_complete()
        num_tokens = self.last.num_tokens
        data = torch.empty(0)
        if self.shape is not None:
            data = torch.empty(self.shape, dtype=dtype_of(self.dtype))
            start = 0
            for blocks, part, _ in parts:
                place_blocks(data, list(range(start, start + blocks)), part)
                start += blocks
        block_hashes = [block_hash for _, _, hashes in parts for block_hash in hashes]
        return KvExport(list(token_ids[:num_tokens]), num_tokens, block_hashes, data, self.first_block)


def _finished_writing(writing: set[asyncio.Future]) -> Callable[[asyncio.Future], None]:
    """Done callback of a chunk's thread work: off the pending set, its error read (the caller
    that awaited it may have been cancelled, and its failure is the transfer's anyway)."""

    def finished(work: asyncio.Future) -> None:
        writing.discard(work)
        if not work.cancelled():
            work.exception()

    return finished
