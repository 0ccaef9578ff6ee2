"""The decode worker's KV pull under faults, on real engines and real gRPC in one process.

A proxy KvTransfer service sits between the decode worker and a real prefill worker and
damages one pull's stream after its first chunk (flips a byte, breaks the stream, or stalls
it). Whatever happens, the decode worker's output equals a local greedy run, the retry or
fallback the design promises is what happened, and no KV block stays allocated on either side.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest

from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import common_pb2, transfer_pb2, transfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.engine import Engine, EngineConfig, SamplingParams
from services.engine.async_engine import AsyncEngine
from services.worker.kv_wire import add_transfer_servicer
from services.worker.servicer import WorkerServicer
from services.worker.transfer_servicer import KvTransferServicer, TransferSender

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


class TamperingProxy(transfer_pb2_grpc.KvTransferServicer):
    """Forwards PullBlocks to a real prefill worker; the next pull suffers ``faults.pop(0)`` on
    its stream ``fault_stream``'s chunk ``fault_at`` (a transfer may be spread over streams)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.faults: list[str] = []
        self.fault_stream, self.fault_at = 0, 1
        self.pulls = 0  # transfers (calls of their stream 0)
        self.calls = 0  # calls of any stream
        self.skipped: list[int] = []  # each transfer's skip_blocks
        self.tcp: list[int] = []  # each transfer's tcp_connections (0: over gRPC)
        self.evict: AsyncEngine | None = None  # the engine whose cache an "evict" fault empties

    async def PullBlocks(
        self, request: transfer_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transfer_pb2.KvBlockChunk]:
        fault = self.faults.pop(0) if self.faults and request.stream_index == self.fault_stream else ""
        self.pulls += not request.stream_index
        self.calls += 1
        if not request.stream_index:
            self.skipped.append(request.skip_blocks)
            self.tcp.append(request.tcp_connections)
        async with mesh_channel(self.target) as channel:
            index = 0
            async for chunk in transfer_pb2_grpc.KvTransferStub(channel).PullBlocks(request):
                at = index == self.fault_at
                if at and fault == "corrupt":
                    chunk.data = bytes([chunk.data[0] ^ 0x01]) + chunk.data[1:]
                elif at and fault == "die":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker went away mid-transfer")
                elif at and fault == "stall":
                    await asyncio.Event().wait()  # until the decode worker's deadline cancels the call
                elif at and fault == "evict":  # the receiver's cache is emptied mid-pull
                    await self.evict.run(lambda e: e.reset_prefix_cache())
                elif chunk.data_port and fault == "unreachable":  # a data port behind a firewall
                    chunk.data_port = closed_port()
                index += 1
                yield chunk


def closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


def small_engine() -> AsyncEngine:
    return AsyncEngine(Engine(EngineConfig(dtype="float32", max_num_seqs=8, num_kv_blocks=160)))


@pytest.fixture(scope="module")
def prefill_engine() -> Iterator[AsyncEngine]:
    engine = small_engine()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def decode_engine() -> Iterator[AsyncEngine]:
    engine = small_engine()
    yield engine
    engine.shutdown()


@dataclass
class Workers:
    prefill_address: str
    prefill: KvTransferServicer
    proxy: TamperingProxy
    proxy_address: str
    decode: WorkerServicer
    decode_address: str


async def serve(add: object, servicer: object) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def workers(prefill_engine: AsyncEngine, decode_engine: AsyncEngine) -> AsyncIterator[Workers]:
    # 64-token prefill steps: a ~200-token prompt streams as several chunks, so faults land mid-transfer.
    transfer = KvTransferServicer(prefill_engine, prefill_chunk_tokens=64, sender=TransferSender("127.0.0.1", 0))
    transfer.sender.tcp.start()  # offered only to a decode worker with transfer_tcp (see the TCP tests)
    prefill, prefill_address = await serve(add_transfer_servicer, transfer)
    proxy = TamperingProxy(prefill_address)
    proxy_server, proxy_address = await serve(transfer_pb2_grpc.add_KvTransferServicer_to_server, proxy)
    decode = WorkerServicer(decode_engine, "decode-test", "decode", 200, transfer_timeout_s=60)
    decode_server, decode_address = await serve(worker_pb2_grpc.add_WorkerServicer_to_server, decode)
    proxy.evict = decode_engine
    yield Workers(prefill_address, transfer, proxy, proxy_address, decode, decode_address)
    for server in (decode_server, proxy_server, prefill):
        await server.stop(0)
    await transfer.sender.tcp.close()


def prompt_ids(tokenizer, topic: str) -> list[int]:
    return tokenizer.encode(f"Notes on {topic}: " + " ".join(f"{topic} item {i} is filed." for i in range(40)))


async def decode(workers: Workers, prompt: list[int], request_id: str, fallbacks: list[str] = (),
                 with_cached_tokens: bool = False) -> list[int] | tuple[list[int], int]:  # fmt: skip
    request = worker_pb2.WorkerGenerateRequest(
        request_id=request_id, token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )  # fmt: skip
    tokens: list[int] = []
    cached_tokens = -1
    async with mesh_channel(workers.decode_address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Decode(worker_pb2.DecodeRequest(
            request=request, prefill_address=workers.proxy_address, fallback_prefill_addresses=fallbacks))  # fmt: skip
        async for response in call:
            cached_tokens = response.cached_tokens if cached_tokens < 0 else cached_tokens
            tokens += response.token_ids
    return (tokens, cached_tokens) if with_cached_tokens else tokens


def expected(engine: Engine, prompt: list[int]) -> list[int]:
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return out.new_token_ids


async def assert_no_blocks_held(*engines: AsyncEngine) -> None:
    """Every block is free or merely cached (free + cached == total); a cancelled prefill
    frees its blocks on the engine thread shortly after the stream ends, hence the wait."""
    for engine in engines:
        for _ in range(100):
            stats = await engine.run(lambda e: e.stats())
            if stats.blocks_used == 0:
                break
            await asyncio.sleep(0.1)
        assert stats.blocks_free + stats.blocks_cached == stats.blocks_total, stats


async def test_a_prompt_of_whole_blocks_is_pulled_without_a_retry(workers, engine, tokenizer, prefill_engine,
                                                                  decode_engine):  # fmt: skip
    """Its last chunk carries no block, only the first token: its checksum is the empty
    payload's, so the pull succeeds the first time (it used to fail and prefill locally)."""
    prompt = prompt_ids(tokenizer, "harbor")
    block_size = prefill_engine.engine.config.block_size
    prompt = prompt[: len(prompt) // block_size * block_size]
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    assert await decode(workers, prompt, "whole-blocks-1") == expected(engine, prompt)
    assert workers.proxy.pulls == 1
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == before
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_a_corrupted_chunk_is_rejected_and_the_pull_retried(workers, engine, tokenizer, prefill_engine,
                                                                  decode_engine):  # fmt: skip
    prompt = prompt_ids(tokenizer, "copper")
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    workers.proxy.faults = ["corrupt"]
    assert await decode(workers, prompt, "corrupt-1") == expected(engine, prompt)
    # No other prefill worker offered: the same one is asked again, and this time delivers.
    assert workers.proxy.pulls == 2
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == (before[0] + 1, before[1])
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_a_prefill_worker_dying_mid_transfer_is_replaced_by_the_next(workers, engine, tokenizer,
                                                                           prefill_engine, decode_engine):  # fmt: skip
    prompt = prompt_ids(tokenizer, "lantern")
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    workers.proxy.faults = ["die"]
    assert await decode(workers, prompt, "die-1", fallbacks=[workers.prefill_address]) == expected(engine, prompt)
    assert workers.proxy.pulls == 1  # the retry went straight to the other prefill worker
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == (before[0] + 1, before[1])
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_a_stalled_transfer_times_out_and_nothing_of_it_is_imported(
    workers, engine, tokenizer, prefill_engine, decode_engine
):
    prompt = prompt_ids(tokenizer, "meadow")
    workers.decode.transfer_timeout_s = 3.0
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    workers.proxy.faults = ["stall"]
    tokens, cached_tokens = await decode(workers, prompt, "stall-1", with_cached_tokens=True)
    # A timeout is not a corruption: with no other prefill worker, straight to local prefill.
    assert tokens == expected(engine, prompt)
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == (before[0], before[1] + 1)
    # Had a chunk received before the stall reached the pool's index, the local prefill would
    # have reused it.
    assert cached_tokens == 0
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_the_blocks_a_pull_skips_are_held_until_it_is_done(workers, engine, tokenizer, prefill_engine,
                                                                  decode_engine):  # fmt: skip
    """The decode worker reserves its cached prefix with the blocks it pulls into: emptying its
    cache mid-pull cannot take them (the import used to find them gone and prefill locally)."""
    first_turn = prompt_ids(tokenizer, "harbour")
    assert await decode(workers, first_turn, "evict-1") == expected(engine, first_turn)
    second_turn = first_turn + tokenizer.encode(" And what of the ships moored there?")
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    workers.proxy.faults = ["evict"]
    assert await decode(workers, second_turn, "evict-2") == expected(engine, second_turn)
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == before
    assert workers.proxy.skipped[-1] == len(first_turn) // decode_engine.engine.config.block_size
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_a_pull_spread_over_three_streams_gives_the_same_output(workers, engine, tokenizer, prefill_engine,
                                                                       decode_engine):  # fmt: skip
    prompt = prompt_ids(tokenizer, "orchard")
    workers.decode.transfer_streams = 3
    try:
        assert await decode(workers, prompt, "streams-1") == expected(engine, prompt)
    finally:
        workers.decode.transfer_streams = 1
    assert (workers.proxy.pulls, workers.proxy.calls) == (1, 3)
    assert len(workers.prefill.sender.streams) == 0  # no share left waiting for a stream
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_a_corrupted_chunk_on_another_stream_fails_the_whole_pull_and_it_is_retried(
    workers, engine, tokenizer, prefill_engine, decode_engine
):
    prompt = prompt_ids(tokenizer, "granite")
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    workers.decode.transfer_streams = 2
    workers.proxy.faults, workers.proxy.fault_stream, workers.proxy.fault_at = ["corrupt"], 1, 0
    try:
        tokens = await decode(workers, prompt, "streams-corrupt-1")
    finally:
        workers.decode.transfer_streams, workers.proxy.fault_stream, workers.proxy.fault_at = 1, 0, 1
    assert tokens == expected(engine, prompt)
    assert (workers.proxy.pulls, workers.proxy.calls) == (2, 4)  # the same prefill worker, asked again
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == (before[0] + 1, before[1])
    assert len(workers.prefill.sender.streams) == 0
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_an_unreachable_data_port_is_pulled_from_over_grpc_instead(workers, engine, tokenizer, prefill_engine,
                                                                         decode_engine):  # fmt: skip
    """The offered port cannot be reached: the same prefill worker is asked again at once over
    gRPC (no retry elsewhere, no local prefill), and over gRPC for a while."""
    prompt = prompt_ids(tokenizer, "quarry")
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    workers.decode.transfer_tcp = True
    workers.proxy.faults = ["unreachable"]
    try:
        assert await decode(workers, prompt, "tcp-unreachable-1") == expected(engine, prompt)
        assert workers.proxy.tcp == [1, 0]  # asked again at once, over gRPC
        assert not workers.decode.transfers.tcp_reachable(workers.proxy_address)  # and so for the next pulls
    finally:
        workers.decode.transfer_tcp = False
        workers.decode.transfers.no_tcp.clear()
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == before
    await asyncio.sleep(0)
    await assert_no_blocks_held(prefill_engine, decode_engine)


async def test_a_corrupted_chunk_on_a_data_connection_is_rejected_and_the_pull_retried(
    workers, engine, tokenizer, prefill_engine, decode_engine
):
    prompt = prompt_ids(tokenizer, "meadow")
    before = (workers.decode.transfers.retries, workers.decode.transfers.fallbacks)
    listener = workers.prefill.sender.tcp
    follow, corrupted = listener.shares, []

    async def corrupting(transfer_id: str, index: int) -> AsyncIterator[bytes]:
        async for message in follow(transfer_id, index):
            if not corrupted:  # one byte of the KV of the transfer's first chunk, after its tag and length
                corrupted.append(transfer_id)
                message = message[:10] + bytes([message[10] ^ 0x01]) + message[11:]
            yield message

    listener.shares = corrupting
    workers.decode.transfer_tcp, workers.decode.transfer_streams = True, 2
    try:
        tokens = await decode(workers, prompt, "tcp-corrupt-1")
    finally:
        listener.shares, workers.decode.transfer_tcp, workers.decode.transfer_streams = follow, False, 1
    assert tokens == expected(engine, prompt)  # the retry, over two TCP connections, gave the right KV
    assert corrupted and workers.proxy.tcp == [2, 2]  # the same worker asked again, over TCP again
    assert workers.proxy.calls == 2  # one call per pull: the KV came on the connections
    assert len(workers.prefill.sender.streams) == 0
    assert (workers.decode.transfers.retries, workers.decode.transfers.fallbacks) == (before[0] + 1, before[1])
    await assert_no_blocks_held(prefill_engine, decode_engine)
