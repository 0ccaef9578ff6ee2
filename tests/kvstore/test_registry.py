"""The Redis block registry: ingestion, sequence tracking, prefix matching, purge, bad input.

Runs against the session's real redis-server; each test has its own namespace.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from kvmesh.hashing import block_hashes
from kvmesh.local_stores import StoreProcess
from kvmesh_proto.v1.kvstore_pb2 import AllCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch
from kvstore.registry import BlockRegistry, RegisteredWorker, TierMatch
from kvstore.validation import MAX_BATCH_BLOCKS, MAX_QUERY_BLOCKS, InvalidInput, ModelMismatch

MODEL = "smollm2-135m@main"
SYSTEM_PROMPT = list(range(1000, 1064))  # 4 blocks shared by every conversation below
QUESTION_A = list(range(2000, 2032))  # 2 blocks
QUESTION_B = list(range(3000, 3048))  # 3 blocks


@pytest.fixture
async def registry(redis_server: StoreProcess, namespace: str) -> AsyncIterator[BlockRegistry]:
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    yield BlockRegistry(client, namespace)
    # Leave the shared server small: every SCAN in later tests walks the whole keyspace.
    keys = [key async for key in client.scan_iter(match=f"kvmesh:{namespace}:*", count=10_000)]
    for start in range(0, len(keys), 10_000):
        await client.unlink(*keys[start : start + 10_000])
    await client.aclose()


def stored(hashes: list[int]) -> KvEvent:
    return KvEvent(stored=BlockStored(block_hashes=hashes))


def removed(hashes: list[int]) -> KvEvent:
    return KvEvent(removed=BlockRemoved(block_hashes=hashes))


def cleared() -> KvEvent:
    return KvEvent(cleared=AllCleared())


def batch(worker: str, seq: int, *events: KvEvent, model: str = MODEL, resync: bool = False) -> KvEventBatch:
    return KvEventBatch(worker_id=worker, model=model, seq=seq, events=events, resync=resync)


def namespace_keys(client: redis.Redis, namespace: str, kind: str = "*") -> list[bytes]:
    return list(client.scan_iter(match=f"kvmesh:{namespace}:{kind}", count=10_000))


def namespace_dump(client: redis.Redis, namespace: str) -> dict[bytes, object]:
    """Every key of the namespace with its value, to compare the index before and after."""
    keys = namespace_keys(client, namespace)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = pipe.execute()
    for key, kind in zip(keys, kinds, strict=True):
        (pipe.smembers if kind == b"set" else pipe.hgetall)(key)
    return dict(zip(keys, pipe.execute(), strict=True))


def assert_consistent(client: redis.Redis, namespace: str) -> None:
    """blk and wrk sets mirror each other, and only known workers appear in either."""
    root = f"kvmesh:{namespace}:"
    dump = {key.decode(): value for key, value in namespace_dump(client, namespace).items()}
    workers = {w.decode() for w in dump.get(f"{root}workers", set())}
    pairs_from_workers = set()
    for worker in workers:
        model = dump[f"{root}wmeta:{worker}"][b"model"].decode()
        for block in dump.get(f"{root}wrk:{worker}", set()):
            pairs_from_workers.add((f"{root}blk:{model}:{block.decode()}", worker))
    pairs_from_blocks = {
        (key, worker.decode()) for key, members in dump.items() if key.startswith(f"{root}blk:") for worker in members
    }
    assert pairs_from_blocks == pairs_from_workers
    per_worker_keys = {key for key in dump if key.startswith((f"{root}wrk:", f"{root}wmeta:"))}
    assert per_worker_keys <= {f"{root}{kind}:{w}" for w in workers for kind in ("wrk", "wmeta")}


# --- ingestion -------------------------------------------------------------------------


async def test_stored_blocks_use_the_documented_key_layout(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT)
    ack = await registry.apply_batch(batch("w1", 0, stored(chain)))

    assert (ack.seq, ack.resync_required, ack.expected_seq) == (0, False, 1)
    for block in chain:
        assert redis_client.smembers(f"kvmesh:{namespace}:blk:{MODEL}:{block:016x}") == {b"w1"}
    assert redis_client.smembers(f"kvmesh:{namespace}:wrk:w1") == {f"{b:016x}".encode() for b in chain}
    assert await registry.workers() == [RegisteredWorker("w1", MODEL, 4, 0)]


async def test_stored_removed_cleared_apply_in_order(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT + QUESTION_A)  # 6 blocks
    await registry.apply_batch(batch("w1", 0, stored(chain), removed(chain[4:]), stored(chain[4:5])))
    assert await registry.find_matches(MODEL, chain) == [("w1", 5)]

    await registry.apply_batch(batch("w1", 1, removed([chain[2]])))
    assert await registry.find_matches(MODEL, chain) == [("w1", 2)]

    await registry.apply_batch(batch("w1", 2, cleared(), stored(chain[:1])))
    assert await registry.find_matches(MODEL, chain) == [("w1", 1)]
    assert [w.blocks for w in await registry.workers()] == [1]
    assert_consistent(redis_client, namespace)


async def test_removing_the_last_holder_leaves_no_block_key(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT)
    await registry.apply_batch(batch("w1", 0, stored(chain)))
    await registry.apply_batch(batch("w1", 1, removed(chain)))

    assert namespace_keys(redis_client, namespace, "blk:*") == []


async def test_batches_larger_than_luas_unpack_limit_are_chunked(registry, redis_client, namespace):
    chain = block_hashes(list(range(20_000 * 16)))  # 20,000 blocks in one event
    await registry.apply_batch(batch("w1", 0, stored(chain)))

    assert await registry.find_matches(MODEL, chain) == [("w1", 20_000)]
    await registry.apply_batch(batch("w1", 1, removed(chain[10_000:])))
    assert await registry.find_matches(MODEL, chain) == [("w1", 10_000)]
    assert_consistent(redis_client, namespace)


# --- sequence tracking -----------------------------------------------------------------


async def test_an_unknown_worker_past_its_first_batch_must_resync(registry):
    """It was purged (lease lapsed) while it kept streaming: its earlier blocks are gone."""
    ack = await registry.apply_batch(batch("w1", 41, stored(block_hashes(SYSTEM_PROMPT))))
    assert (ack.resync_required, ack.expected_seq) == (True, 1)
    assert await registry.workers() == []

    ack = await registry.apply_batch(batch("w1", 42, stored(block_hashes(SYSTEM_PROMPT)), resync=True))
    assert (ack.resync_required, ack.expected_seq) == (False, 43)
    assert (await registry.workers())[0].last_seq == 42


async def test_a_seq_gap_requests_a_resync_and_applies_nothing(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT + QUESTION_A)
    await registry.apply_batch(batch("w1", 0, stored(chain[:2])))
    before = namespace_dump(redis_client, namespace)

    ack = await registry.apply_batch(batch("w1", 2, stored(chain[2:]), removed(chain[:1])))

    assert (ack.seq, ack.resync_required, ack.expected_seq) == (2, True, 1)
    after = namespace_dump(redis_client, namespace)
    counters = f"kvmesh:{namespace}:counters".encode()
    assert after.pop(counters)[b"resyncs_requested"] == b"1"
    before.pop(counters)
    assert after == before


async def test_a_resync_batch_replaces_what_the_worker_held(registry, redis_client, namespace):
    chain_a = block_hashes(SYSTEM_PROMPT + QUESTION_A)
    chain_b = block_hashes(SYSTEM_PROMPT + QUESTION_B)
    await registry.apply_batch(batch("w1", 0, stored(chain_a)))
    assert (await registry.apply_batch(batch("w1", 5, stored(chain_b)))).resync_required

    ack = await registry.apply_batch(batch("w1", 9, cleared(), stored(chain_b), resync=True))
    assert (ack.resync_required, ack.expected_seq) == (False, 10)
    assert await registry.find_matches(MODEL, chain_a) == [("w1", 4)]  # only the shared prefix
    assert await registry.find_matches(MODEL, chain_b) == [("w1", 7)]

    assert not (await registry.apply_batch(batch("w1", 10, removed(chain_b[6:])))).resync_required
    assert await registry.find_matches(MODEL, chain_b) == [("w1", 6)]
    stats = await registry.stats()
    assert (stats.batches_ingested, stats.resyncs_requested) == (3, 1)
    assert_consistent(redis_client, namespace)


async def test_a_duplicate_or_old_seq_is_ignored_without_resync(registry):
    chain = block_hashes(SYSTEM_PROMPT)
    await registry.apply_batch(batch("w1", 0, stored(chain[:1])))
    await registry.apply_batch(batch("w1", 1, stored(chain[1:2])))

    for old_seq in (1, 0):
        ack = await registry.apply_batch(batch("w1", old_seq, stored(chain)))
        assert (ack.seq, ack.resync_required, ack.expected_seq) == (old_seq, False, 2)
    assert await registry.find_matches(MODEL, chain) == [("w1", 2)]


async def test_sequence_numbers_keep_full_uint64_precision(registry):
    # Doubles (Lua numbers) cannot tell 2^60 + 1 from 2^60 + 2: the index must.
    base = 2**60
    await registry.apply_batch(batch("w1", base, resync=True))
    assert not (await registry.apply_batch(batch("w1", base + 1))).resync_required

    ack = await registry.apply_batch(batch("w1", base + 3))
    assert (ack.resync_required, ack.expected_seq) == (True, base + 2)
    assert (await registry.apply_batch(batch("w1", 999))).expected_seq == base + 2


# --- prefix matching ---------------------------------------------------------------------


async def test_shared_and_diverging_prefixes(registry):
    chain_a = block_hashes(SYSTEM_PROMPT + QUESTION_A)  # 6 blocks
    chain_b = block_hashes(SYSTEM_PROMPT + QUESTION_B)  # 7 blocks
    await registry.apply_batch(batch("w-a", 0, stored(chain_a)))
    await registry.apply_batch(batch("w-b", 0, stored(chain_b)))
    await registry.apply_batch(batch("w-sys", 0, stored(chain_a[:4])))

    assert chain_a[:4] == chain_b[:4] and chain_a[4] != chain_b[4]
    assert await registry.find_matches(MODEL, chain_a) == [("w-a", 6), ("w-b", 4), ("w-sys", 4)]
    assert await registry.find_matches(MODEL, chain_b) == [("w-b", 7), ("w-a", 4), ("w-sys", 4)]
    assert await registry.find_matches(MODEL, block_hashes(QUESTION_A + SYSTEM_PROMPT)) == []
    assert await registry.find_matches(MODEL, []) == []


async def test_a_match_stops_at_the_first_missing_block(registry):
    chain = block_hashes(SYSTEM_PROMPT + QUESTION_A)
    await registry.apply_batch(batch("w1", 0, stored(chain[:2] + chain[3:])))
    await registry.apply_batch(batch("w2", 0, stored(chain[1:])))

    assert await registry.find_matches(MODEL, chain) == [("w1", 2)]


async def test_matches_agree_with_a_block_by_block_count(registry):
    # Workers stop at every offset, some with holes further on, across the script's
    # step boundaries: the answer must equal the obvious count.
    rng = random.Random(7)
    chain = block_hashes(list(range(70 * 16)))
    held: dict[str, list[int]] = {}
    for n in range(40):
        prefix = rng.randrange(0, len(chain) + 1)
        later = rng.sample(range(prefix + 1, len(chain)), k=min(5, max(0, len(chain) - prefix - 1)))
        held[f"w{n:02d}"] = chain[:prefix] + [chain[i] for i in later]
        await registry.apply_batch(batch(f"w{n:02d}", 0, stored(held[f"w{n:02d}"])))

    def leading(blocks: list[int]) -> int:
        have = set(blocks)
        return next((i for i, block in enumerate(chain) if block not in have), len(chain))

    expected = sorted(((w, leading(b)) for w, b in held.items() if leading(b)), key=lambda m: (-m[1], m[0]))
    assert await registry.find_matches(MODEL, chain) == expected
    subset = sorted(held)[::3]
    assert await registry.find_matches(MODEL, chain, subset) == [m for m in expected if m[0] in subset]


async def test_worker_ids_restrict_the_answer(registry):
    chain = block_hashes(SYSTEM_PROMPT + QUESTION_A)
    for seq, worker in enumerate(["w1", "w2", "w3"]):
        await registry.apply_batch(batch(worker, 0, stored(chain[: 2 + seq])))

    assert await registry.find_matches(MODEL, chain, ["w1", "w3", "unknown"]) == [("w3", 4), ("w1", 2)]
    assert await registry.find_matches(MODEL, chain, ["w1", "w1", "w3"]) == [("w3", 4), ("w1", 2)]
    assert await registry.find_matches(MODEL, chain, ["unknown"]) == []


async def test_two_models_never_share_blocks(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT)
    await registry.apply_batch(batch("w1", 0, stored(chain), model="model-x@r1"))
    await registry.apply_batch(batch("w2", 0, stored(chain[:2]), model="model-x@r2"))

    assert await registry.find_matches("model-x@r1", chain) == [("w1", 4)]
    assert await registry.find_matches("model-x@r2", chain) == [("w2", 2)]
    assert await registry.find_matches("model-y", chain) == []
    assert_consistent(redis_client, namespace)


async def test_a_worker_cannot_switch_models(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT)
    await registry.apply_batch(batch("w1", 0, stored(chain[:1])))
    before = namespace_dump(redis_client, namespace)

    with pytest.raises(ModelMismatch, match="another worker_id"):
        await registry.apply_batch(batch("w1", 1, stored(chain), model="other"))
    with pytest.raises(ModelMismatch):
        await registry.apply_batch(batch("w1", 7, cleared(), stored(chain), model="other", resync=True))
    assert namespace_dump(redis_client, namespace) == before


async def test_replies_are_read_with_a_decoding_client_too(redis_server, namespace):
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    registry = BlockRegistry(client, namespace)
    chain = block_hashes(SYSTEM_PROMPT)
    await registry.apply_batch(batch("w1", 3, stored(chain), resync=True))

    assert await registry.find_matches(MODEL, chain) == [("w1", 4)]
    assert await registry.workers() == [RegisteredWorker("w1", MODEL, 4, 3)]
    await client.aclose()


# --- purge -------------------------------------------------------------------------------


async def test_purge_removes_only_that_workers_blocks(registry, redis_client, namespace):
    chain = block_hashes(SYSTEM_PROMPT + QUESTION_A)
    await registry.apply_batch(batch("w1", 0, stored(chain)))
    await registry.apply_batch(batch("w2", 0, stored(chain[:3])))

    assert await registry.purge("w1") == 6
    assert await registry.find_matches(MODEL, chain) == [("w2", 3)]
    assert [w.worker_id for w in await registry.workers()] == ["w2"]
    assert_consistent(redis_client, namespace)
    assert await registry.purge("w1") == 0
    assert await registry.purge("never-seen") == 0

    assert await registry.purge("w2") == 3
    assert set(namespace_dump(redis_client, namespace)) == {f"kvmesh:{namespace}:counters".encode()}


async def test_a_purged_worker_may_return_with_another_model(registry):
    await registry.apply_batch(batch("w1", 5, stored(block_hashes(SYSTEM_PROMPT))))
    await registry.purge("w1")

    ack = await registry.apply_batch(batch("w1", 0, stored(block_hashes(QUESTION_A)), model="other"))
    assert not ack.resync_required
    assert await registry.workers() == [RegisteredWorker("w1", "other", 2, 0)]


async def test_stats_sum_blocks_and_count_ingestion(registry):
    await registry.apply_batch(batch("w1", 0, stored(block_hashes(SYSTEM_PROMPT))))
    await registry.apply_batch(batch("w2", 0, stored(block_hashes(QUESTION_B))))
    await registry.apply_batch(batch("w2", 1, removed(block_hashes(QUESTION_B)[:1])))

    stats = await registry.stats()
    totals = (stats.blocks, stats.batches_ingested, stats.blocks_ingested, stats.resyncs_requested)
    assert totals == (6, 3, 7, 0)
    assert [(w.worker_id, w.blocks, w.last_seq) for w in stats.workers] == [("w1", 4, 0), ("w2", 2, 1)]


# --- bad input ---------------------------------------------------------------------------

ODD_WORKER_IDS = ["", "w 1", "w/1", "w:1", "wörker", "w*", "x" * 129, "w\n"]
GOOD_EVENT = stored(block_hashes(QUESTION_A))
BAD_BATCHES = {
    **{f"worker_id={w!r:.12}": batch(w, 1, GOOD_EVENT) for w in ODD_WORKER_IDS},
    "no model": batch("w1", 1, GOOD_EVENT, model=""),
    "model with space": batch("w1", 1, GOOD_EVENT, model="smol lm"),
    "model of 257 chars": batch("w1", 1, GOOD_EVENT, model="m" * 257),
    "event without payload": batch("w1", 1, GOOD_EVENT, KvEvent()),
    "seq without successor": batch("w1", 2**64 - 1, GOOD_EVENT),
    "too many hashes": batch("w1", 1, GOOD_EVENT, removed(list(range(MAX_BATCH_BLOCKS)))),
}


@pytest.mark.parametrize("bad", BAD_BATCHES.values(), ids=BAD_BATCHES.keys())
async def test_a_rejected_batch_leaves_the_index_as_it_was(registry, redis_client, namespace, bad):
    await registry.apply_batch(batch("w1", 0, stored(block_hashes(SYSTEM_PROMPT))))
    before = namespace_dump(redis_client, namespace)

    with pytest.raises(InvalidInput):
        await registry.apply_batch(bad)
    assert namespace_dump(redis_client, namespace) == before
    assert_consistent(redis_client, namespace)


BAD_QUERIES = {
    "100,000 hashes": (MODEL, list(range(100_000)), None),
    "negative hash": (MODEL, [1, -1], None),
    "hash above u64": (MODEL, [2**64], None),
    "hash not an int": (MODEL, [1.5], None),
    "empty model": ("", [1], None),
    "odd worker filter": (MODEL, [1], ["w1", "w 2"]),
}


@pytest.mark.parametrize(("model", "hashes", "worker_ids"), BAD_QUERIES.values(), ids=BAD_QUERIES.keys())
async def test_a_bad_query_is_rejected_clearly(registry, model, hashes, worker_ids):
    with pytest.raises(InvalidInput):
        await registry.find_matches(model, hashes, worker_ids)


async def test_the_longest_accepted_query_is_answered(registry):
    chain = block_hashes(list(range(MAX_QUERY_BLOCKS * 16)))
    await registry.apply_batch(batch("w1", 0, stored(chain[:100])))

    assert await registry.find_matches(MODEL, chain) == [("w1", 100)]


@pytest.mark.parametrize("worker_id", ODD_WORKER_IDS)
async def test_purge_rejects_an_odd_worker_id(registry, worker_id):
    with pytest.raises(InvalidInput, match="worker_id"):
        await registry.purge(worker_id)


# --- KV tiers: a block stays matched while its worker holds it in any tier, and a by-tier
# match says how much of the overlap is a copy to promote rather than a device hit.

HOST, DISK = 1, 2
CHAIN = block_hashes(SYSTEM_PROMPT)  # 4 blocks


def stored_in(tier: int, hashes: list[int]) -> KvEvent:
    return KvEvent(stored=BlockStored(block_hashes=hashes, tier=tier))


def removed_from(tier: int, hashes: list[int]) -> KvEvent:
    return KvEvent(removed=BlockRemoved(block_hashes=hashes, tier=tier))


async def test_a_block_moving_down_and_back_up_stays_matched_with_its_tier(registry: BlockRegistry):
    await registry.apply_batch(batch("w1", 1, stored(CHAIN)))
    # The pool evicts the last two blocks to host memory (the engine's order: pool events first).
    await registry.apply_batch(batch("w1", 2, KvEvent(removed=BlockRemoved(block_hashes=CHAIN[2:])),
                                     stored_in(HOST, CHAIN[2:])))
    assert await registry.find_matches_by_tier(MODEL, CHAIN) == [TierMatch("w1", 4, 2, 0)]
    # Host memory spills the last one to disk; then the third is promoted back to the device.
    await registry.apply_batch(batch("w1", 3, removed_from(HOST, CHAIN[3:]), stored_in(DISK, CHAIN[3:])))
    await registry.apply_batch(batch("w1", 4, stored(CHAIN[2:3]), removed_from(HOST, CHAIN[2:3])))
    assert await registry.find_matches_by_tier(MODEL, CHAIN) == [TierMatch("w1", 4, 0, 1)]
    assert await registry.find_matches(MODEL, CHAIN) == [("w1", 4)]
    # Gone from its last tier: the chain ends before it.
    await registry.apply_batch(batch("w1", 5, removed_from(DISK, CHAIN[3:])))
    assert await registry.find_matches_by_tier(MODEL, CHAIN) == [TierMatch("w1", 3, 0, 0)]


async def test_a_block_on_the_device_counts_as_a_device_hit_whatever_else_holds_it(registry: BlockRegistry):
    await registry.apply_batch(batch("w1", 1, stored(CHAIN), stored_in(DISK, CHAIN)))
    await registry.apply_batch(batch("w2", 1, stored_in(HOST, CHAIN[:2]), stored_in(DISK, CHAIN)))
    assert await registry.find_matches_by_tier(MODEL, CHAIN) == [TierMatch("w1", 4, 0, 0), TierMatch("w2", 4, 2, 2)]
    assert await registry.find_matches_by_tier(MODEL, CHAIN, ["w2"]) == [TierMatch("w2", 4, 2, 2)]


async def test_tier_records_vanish_with_the_blocks(registry: BlockRegistry, redis_server: StoreProcess,
                                                   namespace: str):
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    await registry.apply_batch(batch("w0", 1, stored(CHAIN)))
    assert namespace_keys(client, namespace, "wtier:*") == []  # untiered workers write nothing extra
    await registry.apply_batch(batch("w1", 1, stored_in(HOST, CHAIN)))
    await registry.apply_batch(batch("w2", 1, stored_in(DISK, CHAIN)))
    assert len(namespace_keys(client, namespace, "wtier:*")) == 2
    # A resync keeps only what the snapshot names; a purge forgets the worker.
    await registry.apply_batch(batch("w1", 9, stored(CHAIN), resync=True))
    await registry.purge("w2")
    assert namespace_keys(client, namespace, "wtier:*") == []
    assert await registry.find_matches_by_tier(MODEL, CHAIN) == [TierMatch("w0", 4, 0, 0), TierMatch("w1", 4, 0, 0)]
    client.close()


async def test_an_unknown_tier_is_refused(registry: BlockRegistry):
    with pytest.raises(InvalidInput, match="tier 8"):
        await registry.apply_batch(batch("w1", 1, stored_in(8, CHAIN)))
