"""The kv routing costs: blocks (prefill what is not cached, plus what is already decoding) and ttft
(when the first token would come, then the least loaded of the near-earliest)."""

from __future__ import annotations

import random

import pytest

from kvmesh.config import RouterSettings
from router.scoring import (
    Candidate,
    KvCost,
    RoundRobin,
    StepTimes,
    TierWeights,
    choose_first_token,
    choose_kv,
    first_token_s,
    own_prefill_s,
    rank_by_cost,
    worker_cost,
)
from services.engine.timing_model import TimingProfile


def test_cost_is_blocks_to_prefill_plus_decode_load():
    worker = Candidate("w", prefix_overlap=6, active_blocks=10, waiting_requests=1)
    assert worker_cost(worker, prompt_blocks=8, overlap_weight=1.0) == 2 + 10 + 8
    assert worker_cost(worker, prompt_blocks=8, overlap_weight=2.0) == 4 + 10 + 8


def test_a_lower_tier_hit_costs_more_than_a_device_hit_and_less_than_a_recompute():
    weights = TierWeights(host=0.1, disk=0.25)
    device = Candidate("device", prefix_overlap=8, active_blocks=0)
    host = Candidate("host", prefix_overlap=8, active_blocks=0, host_overlap=8)
    disk = Candidate("disk", prefix_overlap=8, active_blocks=0, disk_overlap=8)
    cold = Candidate("cold", prefix_overlap=0, active_blocks=0)
    costs = [worker_cost(c, 10, 1.0, weights) for c in (device, host, disk, cold)]
    assert costs == [2, 2 + 0.8, 2 + 2, 10]
    assert choose_kv([cold, disk, host, device], 10, tier_weights=weights).worker_id == "device"
    assert rank_by_cost([cold, disk, host, device], 10, tier_weights=weights) == ["device", "host", "disk", "cold"]
    # Without weights a copy is free: the pre-tier cost.
    assert worker_cost(disk, 10, 1.0) == worker_cost(device, 10, 1.0)


def test_longest_prefix_wins_when_load_is_equal():
    decision = choose_kv([Candidate("a", 2, 0), Candidate("b", 7, 0), Candidate("c", 0, 0)], prompt_blocks=8)
    assert decision.worker_id == "b"
    assert decision.prefix_overlap == 7
    assert decision.runner_up_cost == 6


def test_load_outweighs_a_small_overlap():
    busy = Candidate("busy", prefix_overlap=2, active_blocks=40)
    idle = Candidate("idle", prefix_overlap=0, active_blocks=0)
    assert choose_kv([busy, idle], prompt_blocks=8).worker_id == "idle"


def test_ties_are_spread_and_temperature_spreads_near_ties():
    rng = random.Random(0)
    equal = [Candidate("a", 0, 0), Candidate("b", 0, 0)]
    assert {choose_kv(equal, 4, rng=rng).worker_id for _ in range(50)} == {"a", "b"}
    near = [Candidate("a", 4, 0), Candidate("b", 3, 0)]
    assert {choose_kv(near, 4, rng=rng).worker_id for _ in range(50)} == {"a"}
    assert {choose_kv(near, 4, temperature=1.0, rng=rng).worker_id for _ in range(200)} == {"a", "b"}


def test_round_robin_cycles_in_a_stable_order_and_refuses_nothing_to_choose():
    rr = RoundRobin()
    assert [rr.choose(["b", "a"]) for _ in range(4)] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError):
        rr.choose([])
    with pytest.raises(ValueError):
        choose_kv([], 4)


def test_fallback_prefill_workers_are_ranked_cheapest_first():
    candidates = [Candidate("busy", 0, 40), Candidate("warm", 8, 2), Candidate("cold", 0, 2)]
    assert rank_by_cost(candidates, prompt_blocks=10, overlap_weight=2.0) == ["warm", "cold", "busy"]


# The ttft cost, with round coefficients: 1 ms per prefilled token, 1 µs per attention pair,
# 0.1 ms per decode row, 1 µs per decode context token; blocks of 16 tokens.
TIMES = StepTimes(per_prefill_token=1e-3, per_prefill_attention_pair=1e-6, per_decode_seq=1e-4,
                  per_decode_context_token=1e-6)  # fmt: skip


def test_first_token_is_queued_prefill_plus_own_prefill_plus_decode_rows():
    worker = Candidate("w", prefix_overlap=4, active_blocks=10, running_requests=2, queued_prefill_s=0.5)
    # 100 prompt tokens, 64 cached: 36 to prefill, attending over 64 + 36·37/2 pairs.
    own = 36e-3 + 1e-6 * (36 * 64 + 36 * 37 // 2)
    assert own_prefill_s(worker, 100, 16, TIMES) == pytest.approx(own)
    assert first_token_s(worker, 100, 16, TIMES) == pytest.approx(0.5 + own + 2e-4 + 160e-6)
    # A fully cached prompt still computes its last token; host-tier hits add their copies.
    held = Candidate("h", prefix_overlap=8, active_blocks=0, host_overlap=8)
    assert own_prefill_s(held, 128, 16, TIMES) == pytest.approx(1e-3 + 1e-6 * 128)
    assert own_prefill_s(held, 128, 16, TIMES, TierWeights(0.5, 1.0)) == pytest.approx(1e-3 + 128e-6 + 64e-3)
    # Queued requests this router does not know of are priced as prefills of this prompt.
    reported = Candidate("r", prefix_overlap=0, active_blocks=0, waiting_requests=2)
    assert first_token_s(reported, 100, 16, TIMES) == pytest.approx(3 * TIMES.prefill_s(100, 0))


def test_a_conversation_stays_with_its_history_even_on_a_busier_worker():
    # 60 blocks of history (~1 s to recompute) against a 50 ms slack: only the holder is near.
    holder = Candidate("holder", prefix_overlap=60, active_blocks=900, running_requests=3)
    idle = Candidate("idle", prefix_overlap=0, active_blocks=0)
    decision = choose_first_token([idle, holder], 1000, 16, TIMES, slack_s=0.05)
    assert decision.worker_id == "holder"
    assert decision.prefill_s == pytest.approx(own_prefill_s(holder, 1000, 16, TIMES))


def test_within_the_slack_the_least_loaded_wins_not_the_shared_prefix():
    # A shared 2-block system prompt saves 32 ms: inside a 50 ms slack, so load decides.
    warm_busy = Candidate("warm-busy", prefix_overlap=2, active_blocks=400, running_requests=2)
    cold_idle = Candidate("cold-idle", prefix_overlap=0, active_blocks=0)
    assert choose_first_token([warm_busy, cold_idle], 100, 16, TIMES, slack_s=0.05).worker_id == "cold-idle"
    # Without slack the earliest first token wins.
    assert choose_first_token([warm_busy, cold_idle], 100, 16, TIMES, slack_s=0.0).worker_id == "warm-busy"


def test_a_long_prefill_queue_sends_the_request_elsewhere():
    queued = Candidate("queued", prefix_overlap=60, active_blocks=0, queued_prefill_s=5.0)
    other = Candidate("other", prefix_overlap=0, active_blocks=0)
    assert choose_first_token([queued, other], 1000, 16, TIMES, slack_s=0.05).worker_id == "other"
    assert KvCost(times=TIMES, slack_s=0.05).rank([queued, other], 1000, 16) == ["other", "queued"]


def test_kv_cost_follows_the_settings():
    ttft = KvCost.from_settings(RouterSettings(kv_cost="ttft", cost_profile="h100-llama3-8b", ttft_slack_ms=30))
    assert ttft.slack_s == pytest.approx(0.03)
    assert ttft.times == StepTimes.from_profile(TimingProfile.load("h100-llama3-8b"))
    blocks = KvCost.from_settings(RouterSettings(kv_cost="blocks", overlap_weight=2.0))
    assert blocks.times is None
    candidates = [Candidate("warm", 6, 10), Candidate("cold", 0, 0)]
    assert blocks.choose(candidates, 8 * 16, 16).cost == worker_cost(candidates[0], 8, 2.0)
    with pytest.raises(ValueError):
        RouterSettings(kv_cost="seconds")
    with pytest.raises(ValueError):
        KvCost.from_settings(RouterSettings(kv_cost="ttft", cost_profile="no-such-profile"))


def test_equally_loaded_near_workers_go_to_the_earliest_first_token():
    # Both idle and both within the slack: the one holding more of the prompt keeps it.
    holder = Candidate("holder", prefix_overlap=2, active_blocks=0)
    rng = random.Random(0)
    others = [Candidate(f"idle-{i}", prefix_overlap=0, active_blocks=0) for i in range(4)]
    assert {choose_first_token([*others, holder], 100, 16, TIMES, 0.05, rng).worker_id for _ in range(20)} == {
        "holder"}
    assert len({choose_first_token(others, 100, 16, TIMES, 0.05, rng).worker_id for _ in range(50)}) > 1
