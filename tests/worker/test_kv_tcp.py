"""KV chunks on TCP connections beside the PullBlocks call: bit-exact, checked, and refused or
failed cleanly when the connection, its token or its bytes are wrong (real sockets, real gRPC)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.kv_transfer import KvExport
from services.worker.kv_receive import ChunkAssembler, receive_into
from services.worker.kv_tcp import TOKEN_BYTES, DataConnectionError
from services.worker.kv_wire import TransferError, add_transfer_servicer, export_to_chunks
from services.worker.transfer_servicer import TransferSender
from tests.worker.test_kv_wire import SCATTERED, reserved, sample_export


class ExportServicer(transfer_pb2_grpc.KvTransferServicer):
    """Sends one export's chunks (two blocks each) through a worker's ``TransferSender``."""

    def __init__(self, export: KvExport, sender: TransferSender) -> None:
        self.export, self.sender = export, sender
        self.messages_on_call = 0

    async def PullBlocks(self, request, context):
        if request.stream_index:
            async for message in self.sender.follow(request.transfer_id, request.stream_index):
                yield message
            return

        async def chunks():
            chunks = list(export_to_chunks(self.export, 0, 2, request.transfer_id, "r1"))
            chunks[-1].header.last, chunks[-1].header.num_tokens = True, self.export.num_tokens
            for chunk in chunks:
                yield chunk

        async for message in self.sender.send(chunks(), request):
            self.messages_on_call += 1
            yield message


class CorruptingSender(TransferSender):
    """Flips one byte of the KV in the second chunk a TCP connection carries (the KV comes
    first in the message, after its 1-byte tag and its length)."""

    async def follow(self, transfer_id: str, index: int) -> AsyncIterator[bytes]:
        async for number, message in _numbered(super().follow(transfer_id, index)):
            yield message[:10] + bytes([message[10] ^ 0x01]) + message[11:] if number == 1 else message


class HangingUpSender(TransferSender):
    """Its connections close after their first chunk, without the end mark."""

    async def follow(self, transfer_id: str, index: int) -> AsyncIterator[bytes]:
        async for number, message in _numbered(super().follow(transfer_id, index)):
            if number == 1:
                raise OSError("the sender went away")
            yield message


async def _numbered(messages: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    number = 0
    async for message in messages:
        yield number, message
        number += 1


async def serve(servicer: ExportServicer) -> tuple[grpc.aio.Server, str]:
    if servicer.sender.tcp is not None:
        servicer.sender.tcp.start()
    server = grpc.aio.server()
    add_transfer_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def stop(server: grpc.aio.Server, servicer: ExportServicer) -> None:
    await server.stop(0)
    if servicer.sender.tcp is not None:
        await servicer.sender.tcp.close()


async def pull(address: str, export: KvExport, connections: int, tcp: bool = True) -> torch.Tensor:
    """Pull the export into scattered reserved blocks; the blocks as placed."""
    into = reserved(export, SCATTERED)
    request = transfer_pb2.PullBlocksRequest(transfer_id=uuid.uuid4().hex, streams=connections, tcp_data=tcp)
    await receive_into(ChunkAssembler(0, into), address, request, timeout_s=10)
    return into.kv_cache[:, :, SCATTERED]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("connections", [1, 2, 3])
async def test_chunks_over_tcp_land_bit_exactly_and_the_call_carries_only_the_offer(connections):
    export = sample_export()
    servicer = ExportServicer(export, TransferSender("127.0.0.1", 0))
    server, address = await serve(servicer)
    try:
        assert same_bytes(await pull(address, export, connections), export.data)
        assert servicer.messages_on_call == 1  # the data port offer; the blocks came on the connections
        assert len(servicer.sender.streams) == 0  # every share was claimed and drained
        assert not servicer.sender.tcp._offers  # the token lapsed once all its connections came
    finally:
        await stop(server, servicer)


async def test_a_sender_that_offers_no_tcp_sends_everything_on_the_call():
    """A worker running TLS (no listener) answers a TCP pull on its one call, whatever ``streams`` says."""
    export = sample_export()
    servicer = ExportServicer(export, TransferSender())
    server, address = await serve(servicer)
    try:
        assert same_bytes(await pull(address, export, 2), export.data)
        assert servicer.messages_on_call == 4  # 7 blocks, 2 per chunk
        assert len(servicer.sender.streams) == 0
    finally:
        await stop(server, servicer)


async def test_a_corrupted_chunk_on_a_connection_fails_the_pull():
    export = sample_export()
    servicer = ExportServicer(export, CorruptingSender("127.0.0.1", 0))
    server, address = await serve(servicer)
    try:
        with pytest.raises(TransferError, match="checksum mismatch"):
            await pull(address, export, 1)
    finally:
        await stop(server, servicer)


async def test_a_connection_that_closes_early_fails_the_pull_without_hanging():
    export = sample_export()
    servicer = ExportServicer(export, HangingUpSender("127.0.0.1", 0))
    server, address = await serve(servicer)
    try:
        with pytest.raises(TransferError, match="closed mid-transfer"):
            await asyncio.wait_for(pull(address, export, 2), timeout=10)
    finally:
        await stop(server, servicer)


async def test_an_unreachable_data_port_is_a_data_connection_error():
    export = sample_export()
    servicer = ExportServicer(export, TransferSender("127.0.0.1", 0))
    server, address = await serve(servicer)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    servicer.sender.tcp.port = port  # the offer names a port nobody can connect to
    try:
        with pytest.raises(DataConnectionError):
            await pull(address, export, 1)
    finally:
        await stop(server, servicer)


async def test_a_connection_with_an_unknown_token_is_closed_and_the_listener_serves_on():
    export = sample_export()
    servicer = ExportServicer(export, TransferSender("127.0.0.1", 0))
    server, address = await serve(servicer)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", servicer.sender.tcp.port)
        writer.write(bytes(TOKEN_BYTES) + b"\x00")
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, nothing sent
        writer.close()
        assert len(servicer.sender.streams) == 0
        assert same_bytes(await pull(address, export, 1), export.data)
    finally:
        await stop(server, servicer)
