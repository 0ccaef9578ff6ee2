"""KV blocks on the wire: an engine's ``KvExport`` cut into checksummed ``KvBlockChunk``s and
put back together on the other side.

Raw little-endian tensor bytes with dtype, shape and block positions beside them, never
pickle: a receiver trusts nothing it cannot check. A chunk whose checksum or shape does not
add up is refused before any of its bytes reach the KV pool, and the pool blocks a failed
transfer did write are never named, so nothing reads them before they are written again or freed.

Copies, because on CPU they (and the page faults of fresh buffers) are what a transfer costs:
the sender gathers the tensor's rows straight into the gRPC message (``WireChunk.encode``), the
receiver reads ``data`` as a view of gRPC's message bytes (``decode_chunk``) and copies it once,
straight into the pool blocks the decode worker reserved for it (``KvReservation.write``; a
peer fetch, which cannot know its size up front, copies into the tensor ``ChunkAssembler.kv``
returns). The bytes on the wire are plain ``KvBlockChunk`` protobuf either way; each chunk is
checksummed once, over its whole payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch
import xxhash
from google.protobuf.message import DecodeError

from kvmesh.grpc_service import mesh_channel
from kvmesh.telemetry import outgoing_metadata
from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.kv_transfer import KvExport, KvReservation, block_rows, dtype_of, place_blocks

DEFAULT_CHUNK_BLOCKS = 8
_SERVICE = transfer_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name
PULL_BLOCKS_METHOD = f"/{_SERVICE}/PullBlocks"
_DATA_FIELD = transfer_pb2.KvBlockChunk.DESCRIPTOR.fields_by_name["data"].number
_CHECKSUM_FIELD = transfer_pb2.KvBlockChunk.DESCRIPTOR.fields_by_name["checksum"].number
_VARINT_MAX_BYTES = 10


class TransferError(ValueError):
    """A chunk stream that cannot be imported (corrupt, out of order, incomplete)."""


def checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


# glibc malloc serves large blocks with fresh mmap()s and unmaps them when freed, so every
# chunk-sized buffer (gRPC's message bytes, the encoded chunk, the reassembled KV) is new memory
# whose first touch page-faults: on the shared VM that cost more than copying the bytes. Blocks
# below this size come from the heap instead, and up to the trim size of freed heap is kept
# for the next transfer (measured by bench/kv_transfer.py: ~1.6x on the in-process path).
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_transfer_buffers() -> bool:
    """Tune this process's allocator for KV transfers (see above); False where it is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


@dataclass
class WireChunk:
    """A ``KvBlockChunk`` on its way out: every field but ``data`` in ``header``; ``data`` as a
    2-D view of the exported tensor's rows (``block_rows``), gathered into the gRPC message by
    ``encode`` in one copy (a ``bytes`` in the message would cost one copy to build it, one
    to set it and one to serialize it)."""

    header: transfer_pb2.KvBlockChunk
    rows: np.ndarray | None = None

    @property
    def size(self) -> int:
        return 0 if self.rows is None else self.rows.nbytes

    def encode(self) -> bytes:
        """The ``KvBlockChunk`` as protobuf wire bytes: field ``data``, then ``checksum``, then
        the other header fields (protobuf fields may come in any order).

        Built in place (``_unfilled_bytes``) with two calls that release the GIL — one copy of
        the rows, one checksum over the copied bytes — and nothing else that does. The
        fewer the releases the better: a thread that gives up the GIL while another runs
        Python waits up to the switch interval (5 ms) to get it back, so hashing row by row
        (as many releases as rows) made a chunk cost tens of milliseconds in a busy worker,
        and ``bytes.join`` of buffers holds the GIL for the whole copy, stalling the event loop
        and every other stream. The checksum goes after the data, padded to a uint64 varint's
        longest form (valid protobuf), so the message's size is known before it is hashed."""
        size = self.size
        if not size:
            return self.header.SerializeToString()
        self.header.ClearField("checksum")
        lead = _encode_varint(_DATA_FIELD << 3 | 2) + _encode_varint(size)
        rest = self.header.SerializeToString()
        tag = _encode_varint(_CHECKSUM_FIELD << 3)  # wire type 0: a varint
        message, buffer = _unfilled_bytes(len(lead) + size + len(tag) + _VARINT_MAX_BYTES + len(rest))
        buffer[: len(lead)] = np.frombuffer(lead, dtype=np.uint8)
        data = buffer[len(lead) : len(lead) + size]
        np.copyto(data.reshape(self.rows.shape), self.rows)
        self.header.checksum = checksum(data)
        tail = tag + _encode_varint(self.header.checksum, _VARINT_MAX_BYTES) + rest
        buffer[len(lead) + size :] = np.frombuffer(tail, dtype=np.uint8)
        return message


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype, _new_bytes.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype, _bytes_address.argtypes = ctypes.c_void_p, (ctypes.py_object,)


def _unfilled_bytes(size: int) -> tuple[bytes, np.ndarray]:
    """A new ``bytes`` object of ``size`` bytes and a writable view of its contents, to be
    filled before anyone else sees it: how C code builds one (``PyBytes_FromStringAndSize(NULL,
    n)``, then fill). gRPC sends only ``bytes``, and this is the one way to fill one without
    holding the GIL. The view does not keep the object alive: hold the object while writing,
    and drop the view before handing the object on."""
    message = _new_bytes(None, size)
    return message, np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(_bytes_address(message)))


def encode_chunk(chunk: WireChunk | transfer_pb2.KvBlockChunk | bytes) -> bytes:
    """gRPC response serializer for ``PullBlocks`` (a relay may pass plain messages on; a chunk
    already encoded passes as it is)."""
    if isinstance(chunk, bytes):
        return chunk
    return chunk.encode() if isinstance(chunk, WireChunk) else chunk.SerializeToString()


ENCODE_AHEAD = 2


async def encoded_ahead(chunks: AsyncIterator[WireChunk], depth: int = ENCODE_AHEAD) -> AsyncIterator[bytes]:
    """``chunks`` as wire bytes, each encoded in a worker thread while the ones before it are
    on the wire (up to ``depth`` ahead). Off the event loop, because a multi-megabyte chunk's
    copy and checksum would stall every other stream this process serves; ahead, because
    encoding only after gRPC asked for the next message left the link idle meanwhile (the
    stream ran at a third of its raw-bytes rate)."""
    ready: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(maxsize=depth)

    async def encode_all() -> None:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                await ready.put(asyncio.ensure_future(asyncio.to_thread(chunk.encode)))
        await ready.put(None)

    producer = asyncio.create_task(encode_all())
    try:
        while (encoded := await _next_ready(ready, producer)) is not None:
            yield await encoded
        await producer  # its error, if it failed after its last chunk
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


async def _next_ready(ready: asyncio.Queue, producer: asyncio.Task) -> asyncio.Future[bytes] | None:
    """The next encoded chunk, or the producer's error as soon as it fails."""
    get = asyncio.ensure_future(ready.get())
    await asyncio.wait([get, producer], return_when=asyncio.FIRST_COMPLETED)
    if not get.done() and producer.exception() is not None:
        get.cancel()
        raise producer.exception()
    return await get  # a producer that finished left its chunks and the end mark queued


def add_transfer_servicer(servicer: transfer_pb2_grpc.KvTransferServicer, server: grpc.aio.Server) -> None:
    """``add_KvTransferServicer_to_server`` with ``PullBlocks`` sending ``WireChunk``s."""
    handlers = {
        "PushBlocks": grpc.stream_unary_rpc_method_handler(
            servicer.PushBlocks, request_deserializer=transfer_pb2.KvBlockChunk.FromString,
            response_serializer=transfer_pb2.PushBlocksResponse.SerializeToString),
        "PullBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.PullBlocks, request_deserializer=transfer_pb2.PullBlocksRequest.FromString,
            response_serializer=encode_chunk),
    }  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))


def export_to_chunks(
    export: KvExport, first_block: int, chunk_blocks: int, transfer_id: str, request_id: str, first_chunk_index: int = 0
) -> Iterator[WireChunk]:
    """Blocks ``first_block..`` of the sequence (``export`` holds blocks ``export.first_block..``)
    as chunks of ``chunk_blocks`` blocks (all layers), numbered from ``first_chunk_index``.

    The caller sets the last chunk's ``last``, ``num_tokens`` and ``first_token``. The chunks
    view ``export.data``: it must not change until they are sent. Their checksums are set when
    they are encoded.
    """
    layers = export.data.shape[0]
    chunk_blocks = chunk_blocks or DEFAULT_CHUNK_BLOCKS
    end = export.first_block + export.num_blocks
    for index, start in enumerate(range(first_block, end, chunk_blocks), start=first_chunk_index):
        stop = min(start + chunk_blocks, end)
        part = export.data[:, :, start - export.first_block : stop - export.first_block]
        yield WireChunk(transfer_pb2.KvBlockChunk(
            transfer_id=transfer_id, request_id=request_id, chunk_index=index, layer_start=0, layer_count=layers,
            block_indices=range(start, stop), dtype=export.dtype, shape=list(part.shape),
            block_hashes=export.block_hashes[start - export.first_block : stop - export.first_block],
        ), block_rows(part))  # fmt: skip


def closing_chunks(
    export: KvExport, first_block: int, chunk_blocks: int, transfer_id: str, request_id: str, first_chunk_index: int = 0
) -> list[WireChunk]:
    """A stream's final chunks: ``export_to_chunks``, the last one marked ``last`` with the
    ``num_tokens`` the blocks cover. With no block left to send (every block went already, or
    there is none) it is one chunk without KV, checksummed like any other (the checksum of no
    bytes), so the receiver checks it the same way."""
    chunks = list(export_to_chunks(export, first_block, chunk_blocks, transfer_id, request_id, first_chunk_index))
    if not chunks:
        empty = transfer_pb2.KvBlockChunk(transfer_id=transfer_id, request_id=request_id,
                                          chunk_index=first_chunk_index, checksum=checksum(b""))
        chunks = [WireChunk(empty)]
    chunks[-1].header.last = True
    chunks[-1].header.num_tokens = export.num_tokens
    return chunks


# The receiving side's own parse of ``KvBlockChunk`` (same bytes on the wire, any protobuf
# encoder may have written them): the generated parser would copy ``data`` into the message
# and again into every ``chunk.data`` read; here it stays a view into gRPC's message bytes.


def pull_blocks(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    """``KvTransfer.PullBlocks`` on ``channel``, yielding ``decode_chunk``'s (chunk, data) pairs."""
    return channel.unary_stream(PULL_BLOCKS_METHOD, request_serializer=transfer_pb2.PullBlocksRequest.SerializeToString,
                                response_deserializer=decode_chunk)  # fmt: skip


async def receive_into(assembler: ChunkAssembler, address: str, pull: transfer_pb2.PullBlocksRequest,
                       timeout_s: float) -> tuple[float | None, int]:
    """Stream ``pull`` from the worker at ``address`` into ``assembler``, every chunk checked as it
    arrives, over ``pull.streams`` parallel calls (each on its own connection); returns when the
    first chunk arrived (``time.monotonic``, None if none did) and its size. A failure of any
    stream fails the whole transfer and cancels the others."""
    streams = max(1, pull.streams)
    first: list[tuple[float, int]] = []

    async def receive(index: int, channel: grpc.aio.Channel) -> None:
        request = pull if index == 0 else transfer_pb2.PullBlocksRequest(
            transfer_id=pull.transfer_id, request_id=pull.request_id, streams=streams, stream_index=index)
        async for received in pull_blocks(channel)(request, timeout=timeout_s, metadata=outgoing_metadata()):
            if received is None:  # gRPC logs a message decode_chunk refused and hands on None
                raise TransferError(f"{pull.request_id or pull.transfer_id}: a message on stream {index} "
                                    "is not a KvBlockChunk")  # fmt: skip
            chunk, data = received
            if not first:
                first.append((time.monotonic(), len(data)))
            await assembler.add_off_loop(chunk, data)

    try:
        async with contextlib.AsyncExitStack() as stack:
            channels = [await stack.enter_async_context(mesh_channel(address, own_connection=streams > 1))
                        for _ in range(streams)]  # fmt: skip
            await all_or_nothing([receive(index, channel) for index, channel in enumerate(channels)])
    finally:
        await assembler.settle()
    assembler.check_complete()
    return first[0] if first else (None, 0)


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


def decode_chunk(message: bytes) -> tuple[transfer_pb2.KvBlockChunk, memoryview]:
    """gRPC response deserializer for ``PullBlocks``: the chunk without ``data`` (every other
    field parsed by protobuf) and ``data`` as a zero-copy view of ``message``."""
    view = memoryview(message)
    data_spans: list[tuple[int, int, int]] = []  # (field start, bytes start, bytes end)
    pos = 0
    try:
        while pos < len(message):
            start = pos
            key, pos = _varint(message, pos)
            wire_type = key & 7
            if wire_type == 0:
                pos = _varint(message, pos)[1]
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, pos = _varint(message, pos)
                if key >> 3 == _DATA_FIELD:
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


def _encode_varint(value: int, width: int = 0) -> bytes:
    """``value`` as a protobuf varint, padded to ``width`` bytes with continuation bytes when
    given (parsers accept a varint of up to 10 bytes, ``_VARINT_MAX_BYTES``)."""
    out = bytearray()
    while value >= 0x80 or len(out) + 1 < width:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


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
