"""Redis losing the index makes the kvstore ask every connected worker for a full resync: the
monitor notices a Redis that failed and came back, or one restarted (empty) between two polls,
and the servicer sends each open Publish stream an unprompted resync ask. Real redis-server,
restarted on the same port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from kvmesh.local_stores import start_redis
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvstore.index_feed import IndexFeed
from kvstore.registry import BlockRegistry
from kvstore.registry_monitor import RegistryMonitor
from kvstore.server import KvStoreServicer
from tests.kvstore.test_server import CHAT_A, stored


@pytest.fixture
def own_redis(tmp_path):
    store = start_redis(tmp_path / "data", tmp_path / "redis.log")
    yield store
    store.stop()


@pytest.fixture
async def client(own_redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=own_redis.host, port=own_redis.port, socket_timeout=1, socket_connect_timeout=1)
    yield client
    await client.aclose()


async def test_the_monitor_asks_for_resyncs_when_redis_comes_back_or_was_replaced(own_redis, client, namespace):
    resets: list[str] = []
    monitor = RegistryMonitor(client, namespace, resets.append)
    await monitor.check()
    await monitor.check()
    assert (monitor.available, resets) == (True, [])  # a healthy Redis asks nothing

    own_redis.kill()
    await monitor.check()
    assert monitor.available is False and resets == []
    own_redis.start_again()  # back, and empty
    await monitor.check()
    assert monitor.available is True and len(resets) == 1
    await monitor.check()
    assert len(resets) == 1  # asked once

    own_redis.start_again()  # restarted (empty) between two polls: never seen down
    await monitor.check()
    assert resets[1:] == ["Redis lost the index (restarted or replaced)"]


async def test_open_publish_streams_get_an_unprompted_resync_ask(client, namespace):
    servicer = KvStoreServicer(BlockRegistry(client, namespace), IndexFeed())
    server = grpc.aio.server()
    kvstore_pb2_grpc.add_KvStoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outbox: list[kvstore_pb2.KvEventBatch] = [stored(1, "w-a", CHAT_A)]

    async def batches():
        for batch in outbox:
            yield batch
        await asyncio.Event().wait()  # the stream stays open, as a worker's does

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = kvstore_pb2_grpc.KvStoreStub(channel).Publish(batches())
            ack = await call.read()
            assert (ack.seq, ack.resync_required) == (1, False)
            servicer.ask_resync("test")
            ask = await call.read()
            assert (ask.seq, ask.resync_required) == (0, True)
            call.cancel()
    finally:
        await server.stop(0)
