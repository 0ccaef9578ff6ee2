"""KV blocks on the wire: chunks reassemble bit-exactly; corrupt or disordered chunks are refused."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError

from kvmesh_proto.v1 import transfer_pb2, worker_pb2
from services.engine.kv_transfer import KvExport, KvReservation
from services.worker.disagg import pull_prefill
from services.worker.kv_receive import ChunkAssembler, decode_chunk
from services.worker.kv_wire import TransferError, WireChunk, encode_chunk, export_to_chunks

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 3, 7, 16, 2, 8


def sample_export(dtype: torch.dtype = torch.bfloat16) -> KvExport:
    data = torch.randn(LAYERS, 2, BLOCKS, BLOCK_SIZE, HEADS, DIM).to(dtype)
    tokens = list(range(BLOCKS * BLOCK_SIZE - 5))
    return KvExport(tokens, len(tokens), [1000 + i for i in range(BLOCKS - 1)] + [0], data)


def reserved(export: KvExport, block_ids: list[int], first_block: int = 0) -> KvReservation:
    """Blocks ``block_ids`` of a pool of the export's layout (twice its size), reserved for it."""
    shape = list(export.data.shape)
    pool = torch.zeros([*shape[:2], 2 * BLOCKS, *shape[3:]], dtype=export.data.dtype)
    return KvReservation(first_block, block_ids, export.num_tokens, pool)


SCATTERED = [9, 2, 13, 4, 0, 11, 6]  # a pool after some churn hands out blocks in no order


def finish(chunks: list[WireChunk], export: KvExport) -> list[tuple[transfer_pb2.KvBlockChunk, memoryview]]:
    """The chunks as the receiver gets them: encoded by the sender, decoded off the wire."""
    chunks[-1].header.last = True
    chunks[-1].header.num_tokens = export.num_tokens
    return [decode_chunk(encode_chunk(chunk)) for chunk in chunks]


@pytest.mark.parametrize("first_block", [0, 3])
def test_chunks_reassemble_bit_exactly_from_any_first_block(first_block):
    export = sample_export()
    chunks = finish(list(export_to_chunks(export, first_block, 2, "t1", "r1")), export)
    assert len(chunks) == -(-(BLOCKS - first_block) // 2)
    assembler = ChunkAssembler(first_block)
    for chunk in chunks:
        assembler.add(*chunk)
    kv = assembler.kv(export.token_ids)
    assert torch.equal(kv.data.view(torch.uint8), export.data[:, :, first_block:].contiguous().view(torch.uint8))
    assert kv.block_hashes == export.block_hashes[first_block:]
    assert kv.num_tokens == export.num_tokens


def test_a_corrupted_chunk_is_refused():
    export = sample_export()
    chunks = finish(list(export_to_chunks(export, 0, 4, "t1", "r1")), export)
    header, data = chunks[1]
    assembler = ChunkAssembler(0)
    assembler.add(*chunks[0])
    with pytest.raises(TransferError, match="checksum"):
        assembler.add(header, bytes([data[0] ^ 0xFF]) + bytes(data[1:]))


@pytest.mark.parametrize("into", [None, SCATTERED], ids=["kept-then-copied", "into-reserved-blocks"])
def test_chunks_in_any_order_reassemble_bit_exactly(into):
    """A transfer spread over several streams interleaves its chunks; the last one may come first."""
    export = sample_export()
    chunks = finish(list(export_to_chunks(export, 0, 2, "t1", "r1")), export)
    reservation = reserved(export, into) if into else None
    assembler = ChunkAssembler(0, reservation)
    for chunk in [chunks[-1], *chunks[2:-1], chunks[0], chunks[1]]:
        assembler.add(*chunk)
    if reservation is None:
        kv = assembler.kv(export.token_ids)
        assert torch.equal(kv.data.view(torch.uint8), export.data.view(torch.uint8))
        assert kv.block_hashes == export.block_hashes
    else:
        assembler.check_complete()
        placed = reservation.kv_cache[:, :, into]
        assert torch.equal(placed.view(torch.uint8), export.data.view(torch.uint8))
        untouched = sorted(set(range(2 * BLOCKS)) - set(into))
        assert not reservation.kv_cache[:, :, untouched].any()


def test_chunks_that_do_not_fill_or_fit_the_reserved_blocks_are_refused():
    export = sample_export()
    chunks = finish(list(export_to_chunks(export, 0, 2, "t1", "r1")), export)
    with pytest.raises(TransferError, match="beyond the 3 reserved"):
        ChunkAssembler(0, reserved(export, [5, 6, 7])).add(*chunks[1])  # blocks 2..3
    fewer = ChunkAssembler(0, reserved(export, [*SCATTERED, 1]))  # one block more than was sent
    for chunk in chunks:
        fewer.add(*chunk)
    with pytest.raises(TransferError, match=r"7 blocks .* came for the 8 blocks"):
        fewer.check_complete()
    other = sample_export(torch.float16)
    with pytest.raises(TransferError, match="does not fit this pool"):
        ChunkAssembler(0, reserved(export, SCATTERED)).add(*finish(list(export_to_chunks(other, 0, 2, "t", "r")),
                                                                   other)[0])  # fmt: skip


def test_incomplete_or_overlapping_transfers_are_refused():
    export = sample_export()
    chunks = finish(list(export_to_chunks(export, 0, 2, "t1", "r1")), export)
    gap = ChunkAssembler(0)
    for chunk in [chunks[0], *chunks[2:]]:
        gap.add(*chunk)
    with pytest.raises(TransferError, match=r"blocks 2\.\.3 are missing"):
        gap.kv(export.token_ids)
    duplicate = ChunkAssembler(0)
    duplicate.add(*chunks[1])
    with pytest.raises(TransferError, match="not a new run"):
        duplicate.add(*chunks[1])
    with pytest.raises(TransferError, match="not a new run"):
        ChunkAssembler(3).add(*chunks[1])  # blocks 2..3, before the transfer's first block
    partial = ChunkAssembler(0)
    partial.add(*chunks[0])
    with pytest.raises(TransferError, match="before its last chunk"):
        partial.kv(export.token_ids)
    late = ChunkAssembler(0)
    early_last = finish(list(export_to_chunks(export, 0, 2, "t1", "r1"))[:2], export)  # "last" at block 3
    for chunk in [*early_last, *chunks[2:-1]]:
        late.add(*chunk)
    with pytest.raises(TransferError, match="came after the last chunk"):
        late.check_complete()


def test_the_wire_bytes_are_plain_protobuf_both_ways():
    """The sender's one-copy encoding parses with the generated parser into the same message,
    and the receiver's zero-copy decoding reads what any protobuf encoder wrote."""
    export = sample_export()
    (chunk,) = export_to_chunks(export, 0, BLOCKS, "t1", "r1")
    chunk.header.last = True
    parsed = transfer_pb2.KvBlockChunk.FromString(encode_chunk(chunk))
    assert parsed.data == export.data.contiguous().view(torch.uint8).numpy().tobytes()
    assert parsed.checksum == chunk.header.checksum and parsed.last and list(parsed.shape) == list(export.data.shape)
    header, data = decode_chunk(parsed.SerializeToString())
    assert bytes(data) == parsed.data and not header.data
    header.data = parsed.data
    assert header == parsed


def test_a_truncated_message_is_refused():
    message = encode_chunk(next(export_to_chunks(sample_export(), 0, 2, "t1", "r1")))
    with pytest.raises(DecodeError):
        decode_chunk(message[:-1])


async def test_a_message_that_is_not_a_chunk_fails_the_pull_as_a_transfer_error():
    """gRPC hands on None for a message its deserializer refused; the pull must not crash on
    it but fail the way a corrupt chunk does (retried elsewhere, then prefilled locally)."""
    message = encode_chunk(next(export_to_chunks(sample_export(), 0, 2, "t1", "r1")))

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        yield message[:-1]

    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvmesh.v1.KvTransfer",
                                                                          {"PullBlocks": handler}),))  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(TransferError, match="not a KvBlockChunk"):
            await pull_prefill(f"127.0.0.1:{port}", worker_pb2.WorkerGenerateRequest(request_id="r1"), 10,
                               into=reserved(sample_export(), SCATTERED))  # fmt: skip
    finally:
        await server.stop(0)


async def test_a_cancelled_transfer_settles_only_once_its_writes_are_done():
    """Cancelling a pull cannot stop a chunk's write already running in a thread: ``settle``
    (awaited before the reserved blocks are retried or freed) must wait for it."""
    export = sample_export()
    chunks = finish(list(export_to_chunks(export, 0, 2, "t1", "r1")), export)
    reservation = reserved(export, SCATTERED)
    written = threading.Event()
    write = reservation.write

    def slow_write(*args: object) -> None:
        time.sleep(0.3)
        write(*args)
        written.set()

    reservation.write = slow_write
    assembler = ChunkAssembler(0, reservation)
    adding = asyncio.ensure_future(assembler.add_off_loop(*chunks[0]))
    await asyncio.sleep(0.05)
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    assert not written.is_set()
    await assembler.settle()
    assert written.is_set()
