"""KV blocks on the wire: an engine's ``KvExport`` cut into checksummed ``KvBlockChunk``s, and
the format both sides share (the receiving side, which puts them back together, is
``kv_receive.py``).

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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import xxhash

from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.kv_transfer import KvExport, block_rows

DEFAULT_CHUNK_BLOCKS = 8
_SERVICE = transfer_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name
PULL_BLOCKS_METHOD = f"/{_SERVICE}/PullBlocks"
DATA_FIELD = transfer_pb2.KvBlockChunk.DESCRIPTOR.fields_by_name["data"].number
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
        (as many releases as rows) can make a chunk cost tens of milliseconds beside a thread
        busy in Python; ``bytes.join`` of buffers holds the GIL for the whole copy, stalling the event loop
        and every other stream. The checksum goes after the data, padded to a uint64 varint's
        longest form (valid protobuf), so the message's size is known before it is hashed."""
        size = self.size
        if not size:
            return self.header.SerializeToString()
        self.header.ClearField("checksum")
        lead = _encode_varint(DATA_FIELD << 3 | 2) + _encode_varint(size)
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


def _encode_varint(value: int, width: int = 0) -> bytes:
    """``value`` as a protobuf varint, padded to ``width`` bytes with continuation bytes when
    given (parsers accept a varint of up to 10 bytes, ``_VARINT_MAX_BYTES``)."""
    out = bytearray()
    while value >= 0x80 or len(out) + 1 < width:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
