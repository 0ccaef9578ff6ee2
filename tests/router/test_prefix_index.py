"""The router's copy of the block index answers exactly as the kvstore's Redis index does.

The same random stream of batches (stores, removals, clears, resyncs, sequence gaps, purges)
goes into a real ``BlockRegistry``; the ``PrefixIndex`` sees only what the registry applied,
through its ``on_change`` hook, as a following router would. After every step, prefix matches
of many chains must agree.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from kvmesh.local_stores import StoreProcess
from kvmesh_proto.v1.kvstore_pb2 import AllCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch
from kvstore.registry import BlockRegistry
from router.prefix_index import PrefixIndex
from router.scoring import PrefixOverlap

MODEL = "smollm2-135m@main"
OTHER_MODEL = "other@main"
WORKERS = [f"w{i}" for i in range(6)]


def chains(rng: random.Random, count: int) -> list[list[int]]:
    """Chains sharing prefixes: every chain starts with one of three 'system prompts'."""
    roots = [[rng.getrandbits(64) for _ in range(4)] for _ in range(3)]
    return [rng.choice(roots) + [rng.getrandbits(64) for _ in range(rng.randrange(0, 6))] for _ in range(count)]


def random_batch(rng: random.Random, worker: str, seq: int, known: list[list[int]], tiers: bool = True) -> KvEventBatch:
    """Stores, removals (of any tier: a block demoted to host memory or disk, or dropped) and clears."""
    events = []
    for _ in range(rng.randrange(1, 4)):
        chain = rng.choice(known)
        roll = rng.random()
        tier = rng.choice([0, 0, 1, 2]) if tiers else 0
        if roll < 0.6:
            cut = rng.randrange(1, len(chain) + 1)
            events.append(KvEvent(stored=BlockStored(block_hashes=chain[:cut], tier=tier)))
        elif roll < 0.9:
            gone = rng.sample(chain, rng.randrange(1, len(chain) + 1))
            events.append(KvEvent(removed=BlockRemoved(block_hashes=gone, tier=tier)))
        else:
            events.append(KvEvent(cleared=AllCleared()))
    return KvEventBatch(worker_id=worker, model=MODEL, seq=seq, events=events, resync=rng.random() < 0.05)


@pytest.fixture
async def redis_client(redis_server: StoreProcess, namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    keys = [key async for key in client.scan_iter(match=f"kvmesh:{namespace}:*", count=10_000)]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


async def registry_matches(registry: BlockRegistry, model: str, chain: list[int]) -> dict[str, PrefixOverlap]:
    return {m.worker_id: PrefixOverlap(m.matched_blocks, m.host_blocks, m.disk_blocks)
            for m in await registry.find_matches_by_tier(model, chain)}  # fmt: skip


@pytest.mark.parametrize(("seed", "tiers"), [(1, False), (2, True), (3, True)])
async def test_followed_index_matches_the_registry_after_every_change(redis_client, namespace, seed, tiers):
    rng = random.Random(seed)
    index = PrefixIndex()
    registry = BlockRegistry(redis_client, namespace, on_change=index.apply)
    known = chains(rng, 12)
    next_seq = dict.fromkeys(WORKERS, 1)
    for step in range(120):
        worker = rng.choice(WORKERS)
        if rng.random() < 0.05:
            await registry.purge(worker)
            next_seq[worker] = 1
        else:
            # Now and then a gap (the registry refuses it and asks for a resync) or a repeat.
            seq = next_seq[worker] + rng.choice([0, 0, 0, 0, 0, 0, 1, -1])
            ack = await registry.apply_batch(random_batch(rng, worker, max(seq, 1), known, tiers))
            next_seq[worker] = ack.expected_seq
        for chain in known:
            assert index.overlaps(MODEL, chain) == await registry_matches(registry, MODEL, chain), (step, chain)
    assert index.blocks == (await registry.stats()).blocks


async def test_snapshot_rebuilds_the_same_index_and_models_stay_apart(redis_client, namespace):
    rng = random.Random(7)
    live = PrefixIndex()
    registry = BlockRegistry(redis_client, namespace, on_change=live.apply)
    known = chains(rng, 8)
    for seq in range(1, 30):
        for worker in WORKERS[:3]:
            await registry.apply_batch(random_batch(rng, worker, seq, known))
    shared = known[0]
    await registry.apply_batch(KvEventBatch(worker_id="w-other", model=OTHER_MODEL, seq=1,
                                            events=[KvEvent(stored=BlockStored(block_hashes=shared))]))  # fmt: skip

    rebuilt = PrefixIndex()
    for worker in await registry.workers():
        rebuilt.apply(await registry.snapshot_batch(worker))
    for chain in known:
        expected = await registry_matches(registry, MODEL, chain)
        assert live.overlaps(MODEL, chain) == expected == rebuilt.overlaps(MODEL, chain)
        assert "w-other" not in expected
    assert rebuilt.overlaps(OTHER_MODEL, shared) == {"w-other": PrefixOverlap(len(shared))}


def test_a_block_demoted_to_host_memory_still_counts_as_a_host_block():
    index = PrefixIndex()
    chain = [11, 22, 33]
    index.apply(KvEventBatch(worker_id="w", model=MODEL, seq=1,
                             events=[KvEvent(stored=BlockStored(block_hashes=chain)),
                                     KvEvent(stored=BlockStored(block_hashes=chain[2:], tier=1)),
                                     KvEvent(removed=BlockRemoved(block_hashes=chain[2:]))]))  # fmt: skip
    assert index.overlaps(MODEL, chain) == {"w": PrefixOverlap(3, host_blocks=1)}


def test_a_worker_that_left_frees_its_bit_for_the_next():
    index = PrefixIndex()
    for worker in ("a", "b"):
        index.apply(KvEventBatch(worker_id=worker, model=MODEL, seq=1,
                                 events=[KvEvent(stored=BlockStored(block_hashes=[1, 2]))]))  # fmt: skip
    index.apply(KvEventBatch(worker_id="a", resync=True, events=[KvEvent(cleared=AllCleared())]))
    index.apply(KvEventBatch(worker_id="c", model=MODEL, seq=1, events=[KvEvent(stored=BlockStored(block_hashes=[1]))]))
    assert index.overlaps(MODEL, [1, 2]) == {"b": PrefixOverlap(2), "c": PrefixOverlap(1)}
    assert index.blocks == 3
