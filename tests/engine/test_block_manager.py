"""The block manager alone (no model): refcounts, prefix reuse, LRU eviction and its events."""

from kvmesh.hashing import block_hashes
from services.engine.block_manager import BlockManager
from services.engine.kv_events import BlockRemoved, BlockStored
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence


def _seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), 4, 0)


def _compute(bm: BlockManager, seq: Sequence) -> None:
    n = seq.num_tokens - seq.num_computed_tokens
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


def test_full_blocks_are_named_by_the_shared_chain_and_reused():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(10))
    _compute(bm, a)
    assert a.block_hashes == block_hashes(list(range(10)), 4)
    assert bm.take_events() == [BlockStored(tuple(a.block_hashes), None)]
    bm.free(a)
    assert bm.num_used == 0 and bm.num_cached == 2

    b = _seq([*range(8), 99, 98, 97])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 8 and bm.num_cached == 0
    _compute(b_bm := bm, b)
    assert b_bm.num_used == 3


def test_the_last_token_is_never_taken_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(8))
    _compute(bm, a)
    bm.free(a)
    again = _seq(range(8))
    bm.match_prefix(again)
    assert again.num_computed_tokens == 4


def test_eviction_is_lru_and_emits_removed():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = _seq(range(8), "a")
    _compute(bm, a)
    hashes = list(a.block_hashes)
    bm.free(a)
    bm.take_events()
    b = _seq(range(100, 108), "b")
    assert bm.allocate(b, 8)
    # The tail of a's prefix is freed first, so it is evicted before its head.
    assert bm.take_events() == [BlockRemoved((hashes[1],))]
    assert bm.num_free == bm.num_cached == 1  # free counts the evictable block too
    assert not bm.allocate(_seq(range(200, 212), "c"), 12)


def test_shared_blocks_are_refcounted():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = _seq(range(9), "a")
    _compute(bm, a)
    b = _seq(range(9), "b")
    bm.match_prefix(b)
    assert b.block_table[:2] == a.block_table[:2]
    bm.free(a)
    assert bm.num_cached == 0  # b still uses them
    bm.free(b)
    assert bm.num_cached == 2 and bm.num_used == 0
