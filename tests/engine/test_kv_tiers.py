"""KV tiers on the real model: blocks evicted from the device pool come back from host memory
(G2) or disk (G3) instead of being recomputed, the answer is unchanged, the disk tier survives
a restart, a damaged block file is never used, and a disk read runs beside the decode."""

import threading
from pathlib import Path

import pytest

from kvmesh.hashing import block_hashes
from services.engine import Engine, EngineConfig, SamplingParams, kv_tiers
from services.engine.kv_events import AllCleared, BlockRemoved, BlockStored
from services.engine.kv_tier_files import read_block_file
from services.engine.kv_tiers import TIER_DISK, TIER_HOST
from services.engine.sequence import SequenceStatus
from services.engine.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MB = 1 << 20
# A 16-block pool (256 tokens): one turn of the conversation plus the filler does not fit, so
# the filler pushes the conversation's blocks out of the pool between turns.
POOL = 16


def _conversation(tokenizer: Tokenizer) -> list[list[int]]:
    """Two turns of one chat; the second's prompt starts with the whole first turn."""
    messages = [{"role": "system", "content": "You are a patient geography tutor. You answer in one line, name "
                                              "every country involved, give distances in kilometres and never "
                                              "invent facts; when unsure, say so plainly."},
                {"role": "user", "content": "Name the longest river in Africa and the countries it crosses."}]
    first = tokenizer.encode_chat(messages)
    messages += [{"role": "assistant", "content": "The Nile, through eleven countries including Egypt."},
                 {"role": "user", "content": "And which river carries the most water on that continent?"}]
    return [first, tokenizer.encode_chat(messages)]


def _filler(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("Unrelated text that fills the device pool: " + "lorem ipsum dolor sit amet " * 40)[:240]


def _tiered(tmp_path: Path, host_mb: float, disk_mb: float, events: list | None = None) -> Engine:
    config = EngineConfig(num_kv_blocks=POOL, max_num_seqs=4, host_cache_bytes=int(host_mb * MB),
                          disk_cache_bytes=int(disk_mb * MB), disk_cache_dir=str(tmp_path / "kv"))
    return Engine(config, (lambda seq, batch: events.extend(batch)) if events is not None else None)


def _cold(engine: Engine, prompt: list[int]) -> list[int]:
    """The shared engine's answer computed from scratch (its prefix cache dropped first)."""
    engine.reset_prefix_cache()
    return engine.generate([prompt], GREEDY)[0].new_token_ids


def _evict_first_turn(tiered: Engine, tokenizer: Tokenizer, first: list[int]) -> None:
    tiered.generate([first], GREEDY)
    tiered.generate([_filler(tokenizer)], GREEDY)
    assert tiered.cached_prefix_blocks(first) == 0, "the filler should have pushed the first turn out of G1"


def _block_files(tmp_path: Path) -> dict[str, Path]:
    return {p.stem: p for p in (tmp_path / "kv").glob("*/*.kvb")}


@pytest.mark.parametrize(("host_mb", "disk_mb", "tiers"), [
    (64, 0, {TIER_HOST}),            # G2 only
    (0, 64, {TIER_DISK}),            # G3 only
    (1.5, 64, {TIER_HOST, TIER_DISK}),  # two blocks of G2 spill to G3
])
def test_next_turn_reuses_lower_tier_copies_and_matches_a_cold_run(
        engine: Engine, tokenizer: Tokenizer, tmp_path: Path, host_mb: float, disk_mb: float, tiers: set[int]):
    first, second = _conversation(tokenizer)
    tiered = _tiered(tmp_path, host_mb, disk_mb)
    _evict_first_turn(tiered, tokenizer, first)

    out = tiered.generate([second], GREEDY)[0]

    stats = tiered.stats()
    reusable = (len(first) - 1) // 16 * 16  # the first turn's full blocks
    assert out.num_cached_tokens >= reusable > 0
    hits = {TIER_HOST: stats.host_hit_blocks, TIER_DISK: stats.disk_hit_blocks}
    assert {tier for tier, n in hits.items() if n} == tiers
    assert sum(hits.values()) * 16 == out.num_cached_tokens
    assert out.new_token_ids == _cold(engine, second)
    tiered.close()


def test_a_restarted_engine_announces_and_reuses_its_disk_blocks(
        engine: Engine, tokenizer: Tokenizer, tmp_path: Path):
    first, second = _conversation(tokenizer)
    before = _tiered(tmp_path, 0, 64)
    _evict_first_turn(before, tokenizer, first)
    on_disk = set(before.blocks.lower_tier_hashes()[TIER_DISK])
    before.close()

    events: list = []
    after = _tiered(tmp_path, 0, 64, events)

    announced = [e for e in events if isinstance(e, BlockStored) and e.tier == TIER_DISK]
    assert isinstance(events[0], AllCleared) and len(announced) == 1
    assert set(announced[0].block_hashes) == on_disk
    resync = after.resync_events()
    assert any(isinstance(e, BlockStored) and e.tier == TIER_DISK and set(e.block_hashes) == on_disk for e in resync)
    out = after.generate([second], GREEDY)[0]
    assert after.stats().disk_hit_blocks == (len(first) - 1) // 16
    assert out.num_cached_tokens >= (len(first) - 1) // 16 * 16
    assert out.new_token_ids == _cold(engine, second)
    after.close()


def test_a_damaged_disk_block_is_recomputed_not_used(engine: Engine, tokenizer: Tokenizer, tmp_path: Path):
    first, second = _conversation(tokenizer)
    before = _tiered(tmp_path, 0, 64)
    _evict_first_turn(before, tokenizer, first)
    before.close()
    chain = before.blocks.lower_tier_hashes()[TIER_DISK]
    files = _block_files(tmp_path)
    # The first turn's third block: flip one byte in the middle of its payload.
    third = block_hashes(first)[2]
    assert third in chain
    damaged = files[f"{third:016x}"]
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))

    events: list = []
    after = _tiered(tmp_path, 0, 64, events)
    out = after.generate([second], GREEDY)[0]

    assert out.num_cached_tokens == 2 * 16  # the chain stops at the damaged block
    assert after.stats().disk_hit_blocks == 2
    assert any(isinstance(e, BlockRemoved) and e.tier == TIER_DISK and third in e.block_hashes for e in events)
    assert out.new_token_ids == _cold(engine, second)
    after.close()
    assert not damaged.exists()


def test_blocks_from_a_peer_are_kept_only_if_they_name_this_prompt(engine: Engine, tokenizer: Tokenizer):
    first, second = _conversation(tokenizer)
    engine.reset_prefix_cache()
    engine.generate([first], GREEDY)
    # The peer's side: the leading blocks of the second turn it holds (the first turn's).
    export = engine.export_cached(block_hashes(second))
    assert export.num_blocks >= (len(first) - 1) // 16
    engine.reset_prefix_cache()
    before = engine.stats()
    with pytest.raises(ValueError, match="do not name"):
        engine.import_cached(_filler(tokenizer), export)
    assert engine.stats() == before
    assert engine.import_cached(second, export) == export.num_blocks  # the second turn starts with the first
    assert engine.cached_prefix_blocks(second) == export.num_blocks
    out = engine.generate([second], GREEDY)[0]
    assert out.num_cached_tokens == export.num_blocks * 16
    assert out.new_token_ids == _cold(engine, second)


def test_disk_promotion_runs_beside_the_decode_and_an_abort_while_loading_frees_everything(
        engine: Engine, tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    first, second = _conversation(tokenizer)
    tiered = _tiered(tmp_path, 0, 64)
    _evict_first_turn(tiered, tokenizer, first)
    tiered.tiers.disk.flush()  # every block is in its file: a promotion reads them all
    idle_used = tiered.stats().blocks_used
    # Disk reads wait for the test: while they do, the engine must keep stepping.
    gate, reads = threading.Event(), []

    def gated_read(*args):
        reads.append(args[1])
        assert gate.wait(30), "the test never opened the gate"
        return read_block_file(*args)

    monkeypatch.setattr(kv_tiers, "read_block_file", gated_read)
    tiered.add_request("decoder", tokenizer.encode("Count slowly from one to twenty:"),
                       SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    decoded = [o.request_id for o in tiered.step()]
    assert decoded == ["decoder"]

    tiered.add_request("aborted", second, GREEDY)
    assert [o.request_id for o in tiered.step()] == ["decoder"]
    assert tiered.requests["aborted"].status is SequenceStatus.LOADING
    assert tiered.abort("aborted")
    # Only the decoder's blocks are left in use.
    assert tiered.stats().blocks_used == idle_used + len(tiered.requests["decoder"].block_table)
    assert tiered.cached_prefix_blocks(second) == 0  # nothing half-read was named

    tiered.add_request("loader", second, GREEDY)
    for _ in range(3):
        assert [o.request_id for o in tiered.step()] == ["decoder"]
        assert tiered.requests["loader"].status is SequenceStatus.LOADING
    assert not gate.is_set() and reads  # the decoder ran 3 steps while the reads were held

    gate.set()
    outputs: dict[str, list[int]] = {"decoder": [], "loader": []}
    cached = 0
    while tiered.has_unfinished():
        for out in tiered.step():
            outputs[out.request_id] += out.new_token_ids
            cached = out.num_cached_tokens if out.request_id == "loader" else cached
    assert cached == (len(first) - 1) // 16 * 16
    assert outputs["loader"] == _cold(engine, second)
    assert len(outputs["decoder"]) == 14 - 5
    assert tiered.stats().blocks_used == 0  # the aborted request's reads left nothing behind
    tiered.close()


@pytest.mark.parametrize(("host_mb", "disk_mb"), [(64, 0), (0, 64)], ids=["host", "disk"])
def test_a_kv_reservation_reuses_host_blocks_but_never_waits_for_disk(
        tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_mb: float, disk_mb: float):
    """A decode worker reserving a prompt's blocks takes its prefix back from host memory (a copy)
    but not from disk: that read would stall every sequence the engine steps, and the prefill
    worker sends those blocks anyway."""
    first, second = _conversation(tokenizer)
    tiered = _tiered(tmp_path, host_mb, disk_mb)
    _evict_first_turn(tiered, tokenizer, first)
    if tiered.tiers.disk is not None:
        tiered.tiers.disk.flush()
    reads = []
    monkeypatch.setattr(kv_tiers, "read_block_file", lambda *args: reads.append(args) or read_block_file(*args))
    reservation = tiered.reserve_kv("decode", second, GREEDY)
    assert reservation.first_block == ((len(first) - 1) // 16 if host_mb else 0)
    assert not reads
    assert tiered.release_reservation("decode") and tiered.stats().blocks_used == 0
    tiered.close()
