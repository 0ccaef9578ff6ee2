"""KV chunks on TCP connections beside the PullBlocks call: bit-exact, checked, and refused or
failed cleanly when the connection, its token or its bytes are wrong (real sockets, real gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from bench.kv_transfer import ExportServicer
from kvmesh_proto.v1 import transfer_pb2
from services.engine.kv_transfer import KvExport
from services.worker import kv_tcp
from services.worker.kv_receive import ChunkAssembler, receive_into
from services.worker.kv_tcp import TOKEN_BYTES, DataConnectionError
from services.worker.kv_wire import TransferError, add_transfer_servicer
from services.worker.transfer_servicer import TransferSender
from tests.worker.test_kv_wire import SCATTERED, reserved, sample_export


class CountingServicer(ExportServicer):
    """The bench's servicer of one export (chunks of two blocks), counting the messages on the call."""

    def __init__(self, export: KvExport, sender: TransferSender) -> None:
        super().__init__(export, 2, sender)
        self.messages_on_call = 0

    async def PullBlocks(self, request, context):
        async for message in super().PullBlocks(request, context):
            self.messages_on_call += not request.stream_index
            yield message


class CorruptingSender(TransferSender):
    """Flips one byte of the KV in the second chunk a TCP connection carries (the KV comes
    first in the message, after its 1-byte tag and its length)."""

    async def follow(self, transfer_id: str, index: int) -> AsyncIterator[bytes]:
        async for number, message in _numbered(super().follow(transfer_id, index)):
            yield message[:10] + bytes([message[10] ^ 0x01]) + message[11:] if number == 1 else message


class StallingSender(TransferSender):
    """Its connections stall: before their first frame (``midway`` False) or halfway through it."""

    midway = False

    async def follow(self, transfer_id: str, index: int) -> AsyncIterator[bytes]:
        async for message in super().follow(transfer_id, index):
            if self.midway:
                yield message[: len(message) // 2]  # the length says more is coming: it never does
            await asyncio.Event().wait()


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


@contextlib.asynccontextmanager
async def serving(sender: TransferSender, export: KvExport) -> AsyncIterator[tuple[CountingServicer, str]]:
    """``export`` served through ``sender`` (its listener started, if it has one); the servicer and
    its address."""
    servicer = CountingServicer(export, sender)
    if sender.tcp is not None:
        sender.tcp.start()
    server = grpc.aio.server()
    add_transfer_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        if sender.tcp is not None:
            await sender.tcp.close()


async def pull(address: str, export: KvExport, connections: int, timeout_s: float = 10) -> torch.Tensor:
    """Pull the export over ``connections`` TCP connections into scattered reserved blocks; the
    blocks as placed."""
    into = reserved(export, SCATTERED)
    request = transfer_pb2.PullBlocksRequest(transfer_id=uuid.uuid4().hex, tcp_connections=connections)
    await receive_into(ChunkAssembler(0, into), address, request, timeout_s=timeout_s)
    return into.kv_cache[:, :, SCATTERED]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("connections", [1, 2, 3])
async def test_chunks_over_tcp_land_bit_exactly_and_the_call_carries_only_the_offer(connections):
    export = sample_export()
    async with serving(TransferSender("127.0.0.1", 0), export) as (servicer, address):
        assert same_bytes(await pull(address, export, connections), export.data)
        assert servicer.messages_on_call == 1  # the data port offer; the blocks came on the connections
        assert len(servicer.sender.streams) == 0  # every share was claimed and drained
        assert not servicer.sender.tcp._offers  # the token lapsed once all its connections came


async def test_a_sender_that_offers_no_tcp_sends_everything_on_the_call():
    """A worker running TLS (no listener), or one that predates TCP, answers on its one call."""
    export = sample_export()
    async with serving(TransferSender(), export) as (servicer, address):
        assert same_bytes(await pull(address, export, 2), export.data)
        assert servicer.messages_on_call == 4  # 7 blocks, 2 per chunk
        assert len(servicer.sender.streams) == 0


async def test_a_corrupted_chunk_on_a_connection_fails_the_pull():
    export = sample_export()
    async with serving(CorruptingSender("127.0.0.1", 0), export) as (_, address):
        with pytest.raises(TransferError, match="checksum mismatch"):
            await pull(address, export, 1)


async def test_a_connection_that_closes_early_fails_the_pull_without_hanging():
    export = sample_export()
    async with serving(HangingUpSender("127.0.0.1", 0), export) as (_, address):
        with pytest.raises(TransferError, match="closed mid-transfer"):
            await asyncio.wait_for(pull(address, export, 2), timeout=10)


async def test_an_unreachable_data_port_is_a_data_connection_error():
    export = sample_export()
    async with serving(TransferSender("127.0.0.1", 0), export) as (servicer, address):
        closed = socket.create_server(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there now
        servicer.sender.tcp.port = port  # the offer names a port nobody can connect to
        with pytest.raises(DataConnectionError):
            await pull(address, export, 1)


async def test_a_connection_with_an_unknown_token_is_closed_and_the_listener_serves_on():
    export = sample_export()
    async with serving(TransferSender("127.0.0.1", 0), export) as (servicer, address):
        reader, writer = await asyncio.open_connection("127.0.0.1", servicer.sender.tcp.port)
        writer.write(bytes(TOKEN_BYTES) + b"\x00")
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, nothing sent
        writer.close()
        assert len(servicer.sender.streams) == 0
        assert same_bytes(await pull(address, export, 1), export.data)


class HeldOffer:
    """An offer made on a listener and kept open (nobody deals its chunks), for hello tests."""

    def __init__(self, connections: int) -> None:
        self.sender = TransferSender("127.0.0.1", 0)
        self.sender.tcp.start()
        self.token = self.sender.tcp.offer("held", connections)

    async def hello(self, token: bytes, index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.sender.tcp.port)
        writer.write(token + bytes([index]))
        return reader, writer


async def closed_at_once(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), timeout=10) == b""


async def test_only_the_offered_token_each_index_once_and_in_range_opens_a_share():
    held = HeldOffer(connections=2)
    try:
        wrong = bytes(b ^ 0xFF for b in held.token)
        assert await closed_at_once((await held.hello(wrong, 0))[0])
        assert await closed_at_once((await held.hello(held.token, 2))[0])  # connections 0 and 1 only
        reader, writer = await held.hello(held.token, 0)  # claims share 1, waits for its chunks
        assert await closed_at_once((await held.hello(held.token, 0))[0])  # index 0 again
        await asyncio.sleep(0.1)
        assert len(held.sender.streams) == 1 and not reader.at_eof()
        held.sender.streams.end("held", 2)  # the transfer ends: the claimed connection gets the end mark
        assert await asyncio.wait_for(reader.read(), timeout=10) == bytes(8)
        writer.close()
    finally:
        await held.sender.tcp.close()


@pytest.mark.parametrize("midway", [False, True], ids=["before-the-first-frame", "mid-frame"])
async def test_a_stalled_connection_fails_the_pull_at_its_deadline(midway):
    export = sample_export()
    sender = StallingSender("127.0.0.1", 0)
    sender.midway = midway
    async with serving(sender, export) as (_, address):
        with pytest.raises(TransferError, match="not received within"):
            await asyncio.wait_for(pull(address, export, 1, timeout_s=1.5), timeout=10)


async def test_a_data_port_that_drops_connections_is_a_data_connection_error(monkeypatch):
    """A firewall that drops packets (here: a listener whose accept queue is full): the connect
    gives up after CONNECT_TIMEOUT_S, well within the pull's deadline, so the receiver can ask
    for gRPC instead."""
    monkeypatch.setattr(kv_tcp, "CONNECT_TIMEOUT_S", 0.5)
    export = sample_export()
    hole = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(hole.getsockname())
    await asyncio.sleep(0.2)
    try:
        async with serving(TransferSender("127.0.0.1", 0), export) as (servicer, address):
            servicer.sender.tcp.port = hole.getsockname()[1]
            with pytest.raises(DataConnectionError):
                await pull(address, export, 1, timeout_s=30)
    finally:
        for sock in (hole, *fillers):
            sock.close()


async def test_the_listener_accepts_on_after_an_accept_error(monkeypatch):
    loop = asyncio.get_running_loop()
    real_accept, failures = loop.sock_accept, [OSError(24, "Too many open files")]

    async def flaky_accept(sock):
        if failures:
            raise failures.pop()
        return await real_accept(sock)

    monkeypatch.setattr(loop, "sock_accept", flaky_accept)
    export = sample_export()
    async with serving(TransferSender("127.0.0.1", 0), export) as (_, address):
        assert same_bytes(await pull(address, export, 1), export.data)
        assert not failures
