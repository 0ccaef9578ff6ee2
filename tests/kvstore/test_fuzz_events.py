"""Fuzz of the kvstore's event ingestion: malformed and adversarial batches against the real Redis
registry. Each batch is either applied (leaving the index consistent) or refused with InvalidInput
(INVALID_ARGUMENT on the wire) and leaves the index exactly as it was; nothing else may happen."""

from __future__ import annotations

import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from kvmesh.local_stores import StoreProcess
from kvmesh_proto.v1.kvstore_pb2 import AllCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch
from kvstore.validation import MAX_BATCH_BLOCKS, InvalidInput
from tests.fixtures.fuzz import fuzz_settings
from tests.kvstore.test_registry import MODEL, assert_consistent, namespace_dump, registry  # noqa: F401

U64 = st.integers(0, 2**64 - 1)
# A few real hashes reused often, so stored / removed / cleared meet the same blocks.
HASHES = st.one_of(st.sampled_from([1, 2, 3, 2**63, 2**64 - 1]), U64)


def events() -> st.SearchStrategy[KvEvent]:
    hashes = st.lists(HASHES, max_size=12)
    return st.one_of(
        st.builds(lambda h, p: KvEvent(stored=BlockStored(block_hashes=h, parent_hash=p)), hashes, st.none() | U64),
        st.builds(lambda h: KvEvent(removed=BlockRemoved(block_hashes=h)), hashes),
        st.just(KvEvent(cleared=AllCleared())),
        st.just(KvEvent()),  # no payload at all
    )


BATCHES = st.builds(
    KvEventBatch,
    worker_id=st.sampled_from(["w-1", "w-2", "", "bad id", "x" * 129, "w\x00"]) | st.text(max_size=140),
    model=st.sampled_from([MODEL, "other@main", "", "has space", "m" * 300]) | st.text(max_size=300),
    seq=st.sampled_from([0, 1, 2, 3, 2**64 - 1]) | U64,
    events=st.lists(events(), max_size=8),
    resync=st.booleans(),
)
TOO_MANY = KvEventBatch(
    worker_id="w-1", model=MODEL, seq=1,
    events=[KvEvent(stored=BlockStored(block_hashes=list(range(MAX_BATCH_BLOCKS + 1))))],
)  # fmt: skip


@pytest.fixture
def sync_redis(redis_server: StoreProcess) -> redis.Redis:
    return redis.Redis(host=redis_server.host, port=redis_server.port)


@fuzz_settings(ci_examples=400)
@given(batch=BATCHES)
@example(batch=TOO_MANY)
async def test_fuzz_batches_are_applied_or_refused_without_a_trace(registry, sync_redis, namespace, batch):  # noqa: F811
    before = namespace_dump(sync_redis, namespace)
    try:
        ack = await registry.apply_batch(batch)
    except InvalidInput:
        assert namespace_dump(sync_redis, namespace) == before
        return
    assert ack.seq == batch.seq
    assert_consistent(sync_redis, namespace)
