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

from bench.kv_transfer import ExportServicer, chunks_of
from kvmesh_proto.v1 import transfer_pb2
from services.engine.kv_transfer import KvExport
from services.worker import disagg, kv_tcp
from services.worker.disagg import TransferStats
from services.worker.kv_receive import ChunkAssembler, check_offer, receive_into
from services.worker.kv_tcp import TOKEN_BYTES, DataConnectionError
from services.worker.kv_wire import TransferError, add_transfer_servicer, export_to_chunks
from services.worker.transfer_servicer import TransferSender
from services.worker.transfer_streams import TransferStreams
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
            await asyncio.wait_for(pull(address, export, 1, timeout_s=0.6), timeout=10)


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


class FailingServicer(CountingServicer):
    """A prefill that fails after its first chunk was dealt."""

    async def PullBlocks(self, request, context):
        async def chunks():
            first, *_ = chunks_of(self.export, self.chunk_blocks)
            yield first
            raise RuntimeError("the prefill failed")

        async for message in self.sender.send(chunks(), request):
            yield message


async def test_a_sender_failing_mid_transfer_fails_the_pull_and_leaves_nothing_behind():
    export = sample_export()
    sender = TransferSender("127.0.0.1", 0)
    sender.tcp.start()
    servicer = FailingServicer(export, sender)
    server = grpc.aio.server()
    add_transfer_servicer(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        with pytest.raises((TransferError, grpc.aio.AioRpcError)):
            await pull(address, export, 2)
        await asyncio.sleep(0.2)
        assert len(sender.streams) == 0 and not sender.tcp._tasks and not sender.tcp._offers
    finally:
        await server.stop(0)
        await sender.tcp.close()


async def test_a_connection_after_its_call_ended_early_is_refused():
    """The offer went out, then the call ended before any chunk was dealt (the receiver went
    away): the token is withdrawn, so a connection still on its way finds nothing to wait for."""
    sender = TransferSender("127.0.0.1", 0)
    sender.tcp.start()
    try:
        sent = sender.send(_no_chunks(), transfer_pb2.PullBlocksRequest(transfer_id="early", tcp_connections=1))
        offer = transfer_pb2.KvBlockChunk.FromString(await anext(sent))
        await sent.aclose()
        reader, writer = await asyncio.open_connection("127.0.0.1", offer.data_port)
        writer.write(offer.data_token + b"\x00")
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
    finally:
        await sender.tcp.close()


async def _no_chunks() -> AsyncIterator:
    await asyncio.Event().wait()
    yield  # never reached


async def test_a_deal_to_a_stream_that_went_away_fails_instead_of_waiting():
    streams = TransferStreams()
    export = sample_export()

    async def chunks():
        for chunk in export_to_chunks(export, 0, 1, "gone", "r1"):
            yield chunk

    async def deal():
        async for _ in streams.deal(chunks(), "gone", 1, keep_own=False):
            pass

    dealing = asyncio.ensure_future(deal())
    follower = streams.follow("gone", 1)
    await anext(follower)
    await follower.aclose()  # the connection hung up after one chunk
    with pytest.raises(TransferError, match="went away"):
        await asyncio.wait_for(dealing, timeout=10)
    assert len(streams) == 0


@pytest.mark.parametrize("change", ["unasked", "second message", "short token", "no port"])
def test_a_malformed_or_unasked_data_port_offer_is_refused(change):
    offer = transfer_pb2.KvBlockChunk(data_port=5000, data_token=bytes(TOKEN_BYTES))
    asked = transfer_pb2.PullBlocksRequest(transfer_id="t", tcp_connections=1)
    check_offer(offer, asked, 1)  # as a sender makes it: fine
    position = 2 if change == "second message" else 1
    if change == "unasked":
        asked.tcp_connections = 0
    elif change == "short token":
        offer.data_token = bytes(4)
    elif change == "no port":
        offer.data_port = 0
    with pytest.raises(TransferError, match="data port offer"):
        check_offer(offer, asked, position)


def test_an_unreachable_prefill_worker_is_pulled_from_over_grpc_for_a_while_only(monkeypatch):
    stats = TransferStats()
    now = [1000.0]
    monkeypatch.setattr(disagg.time, "monotonic", lambda: now[0])
    stats.no_tcp["p:1"] = now[0] + disagg.NO_TCP_S
    assert not stats.tcp_reachable("p:1") and stats.tcp_reachable("q:1")
    now[0] += disagg.NO_TCP_S
    assert stats.tcp_reachable("p:1") and not stats.no_tcp
