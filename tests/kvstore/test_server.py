"""The kvstore service over gRPC, as workers and routers use it, with real etcd and Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from kvmesh.discovery import Discovery
from kvmesh.hashing import block_hashes
from kvmesh.local_stores import child_env
from kvmesh_proto.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from router.kv_index import KvIndexClient
from router.scoring import PrefixOverlap

MODEL = "SmolLM2-135M-Instruct@test"
SYSTEM_PROMPT = list(range(1000, 1064))  # four full blocks shared by both conversations
CHAT_A = SYSTEM_PROMPT + list(range(5000, 5032))
CHAT_B = SYSTEM_PROMPT + list(range(7000, 7032))


@pytest.fixture(scope="module")
def kvstore_ns(etcd_server, redis_server) -> Iterator[tuple[str, str]]:
    """A kvstore process of its own namespace; yields (namespace, address)."""
    namespace = f"kv{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore.server", "--namespace", namespace,
         "--etcd-endpoint", etcd_server.endpoint, "--redis-url", f"redis://{redis_server.endpoint}/0",
         "--instance-id", "kvstore-test", "--lease-ttl-s", "2"],
        env=child_env(),
    )  # fmt: skip
    address = asyncio.run(_wait_registered(etcd_server.endpoint, namespace, proc))
    yield namespace, address
    proc.terminate()
    proc.wait(10)


async def _wait_registered(endpoint: str, namespace: str, proc: subprocess.Popen) -> str:
    discovery = Discovery(endpoint, namespace)
    try:
        for _ in range(200):
            assert proc.poll() is None, "kvstore exited during start-up"
            instances = await discovery.list("kvstore")
            if instances:
                return next(iter(instances.values())).address
            await asyncio.sleep(0.1)
    finally:
        await discovery.close()
    raise AssertionError("kvstore never registered")


def stored(seq: int, worker: str, tokens: list[int], resync: bool = False) -> kvstore_pb2.KvEventBatch:
    event = kvstore_pb2.KvEvent(stored=kvstore_pb2.BlockStored(block_hashes=block_hashes(tokens)))
    return kvstore_pb2.KvEventBatch(worker_id=worker, model=MODEL, seq=seq, events=[event], resync=resync)


async def publish(stub: kvstore_pb2_grpc.KvStoreStub, batches: list[kvstore_pb2.KvEventBatch]):
    call = stub.Publish(iter(batches))
    return [ack async for ack in call]


async def matches(stub, tokens: list[int]) -> dict[str, int]:
    reply = await stub.FindMatches(kvstore_pb2.FindMatchesRequest(model=MODEL, block_hashes=block_hashes(tokens)))
    return {m.worker_id: m.matched_blocks for m in reply.matches}


async def test_publish_and_find_matches_on_shared_and_diverging_prefixes(kvstore_ns):
    _, address = kvstore_ns
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KvStoreStub(channel)
        acks = await publish(stub, [stored(1, "w-a", CHAT_A), stored(1, "w-b", CHAT_B)])
        assert [a.resync_required for a in acks] == [False, False]
        assert await matches(stub, CHAT_A) == {"w-a": 6, "w-b": 4}
        assert await matches(stub, CHAT_B) == {"w-b": 6, "w-a": 4}
        assert await matches(stub, list(range(9000, 9064))) == {}
        stats = await stub.Stats(kvstore_pb2.KvStoreStatsRequest())
        assert stats.registry_available and stats.blocks >= 12


async def test_sequence_gap_asks_for_resync_and_resync_recovers(kvstore_ns):
    _, address = kvstore_ns
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KvStoreStub(channel)
        first, gap = await publish(stub, [stored(1, "w-gap", CHAT_A[:32]), stored(3, "w-gap", CHAT_A)])
        assert not first.resync_required
        assert gap.resync_required and gap.expected_seq == 2
        assert (await matches(stub, CHAT_A))["w-gap"] == 2  # the gapped batch was not applied
        (ack,) = await publish(stub, [stored(7, "w-gap", CHAT_A, resync=True)])
        assert not ack.resync_required and ack.expected_seq == 8
        assert (await matches(stub, CHAT_A))["w-gap"] == 6


async def test_worker_lease_loss_purges_its_blocks(kvstore_ns, etcd_server):
    namespace, address = kvstore_ns
    discovery = Discovery(etcd_server.endpoint, namespace)
    info = common_pb2.InstanceInfo(instance_id="w-leaving", kind="worker", address="127.0.0.1:1", model=MODEL)
    registration = await discovery.register(info, ttl_s=2)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KvStoreStub(channel)
        await publish(stub, [stored(1, "w-leaving", CHAT_A)])
        assert (await matches(stub, CHAT_A))["w-leaving"] == 6
        await registration.close()
        deadline = time.monotonic() + 5
        while "w-leaving" in await matches(stub, CHAT_A):
            assert time.monotonic() < deadline, "blocks of a departed worker were not purged"
            await asyncio.sleep(0.1)
    await discovery.close()


async def test_bad_input_gets_invalid_argument_and_index_stays_consistent(kvstore_ns):
    _, address = kvstore_ns
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KvStoreStub(channel)
        await publish(stub, [stored(1, "w-good", CHAT_B)])
        before = await matches(stub, CHAT_B)

        huge = kvstore_pb2.FindMatchesRequest(model=MODEL, block_hashes=list(range(100_000)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FindMatches(huge)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        for bad in (stored(1, "bad id/with spaces", CHAT_A), kvstore_pb2.KvEventBatch(model=MODEL, seq=1),
                    kvstore_pb2.KvEventBatch(worker_id="w-x", model=MODEL, seq=1, events=[kvstore_pb2.KvEvent()])):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await publish(stub, [bad])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Purge(kvstore_pb2.PurgeRequest(worker_id="odd\nid"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await stub.Purge(kvstore_pb2.PurgeRequest(worker_id="never-seen"))).blocks_removed == 0
        assert await matches(stub, CHAT_B) == before


async def test_a_router_follows_the_index_snapshot_then_live_changes(kvstore_ns, etcd_server):
    namespace, address = kvstore_ns
    discovery = Discovery(etcd_server.endpoint, namespace)
    follower = KvIndexClient(discovery, timeout_ms=1000, follow=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KvStoreStub(channel)
        await publish(stub, [stored(1, "w-early", CHAT_A)])  # before the router follows: in its snapshot
        await follower.start()
        try:
            await _until(lambda: follower.following, "the router never finished the index snapshot")
            assert {w: o.blocks for w, o in follower.index.overlaps(MODEL, block_hashes(CHAT_A)).items()} == \
                await matches(stub, CHAT_A)

            await publish(stub, [stored(1, "w-late", CHAT_B)])  # a live change
            await _until(lambda: follower.index.overlaps(MODEL, block_hashes(CHAT_B)).get("w-late") == PrefixOverlap(6),
                         "a change applied by the kvstore never reached the router")  # fmt: skip
            found = await follower.find_overlaps(MODEL, block_hashes(CHAT_B))
            assert {w: o.blocks for w, o in found.items()} == await matches(stub, CHAT_B)

            await stub.Purge(kvstore_pb2.PurgeRequest(worker_id="w-early"))
            await _until(lambda: "w-early" not in follower.index.overlaps(MODEL, block_hashes(CHAT_A)),
                         "a purge never reached the router")  # fmt: skip
        finally:
            await follower.stop()
            await discovery.close()


async def _until(condition, message: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)
