"""The kv routing cost: prefill what is not cached, plus what is already decoding."""

from __future__ import annotations

import random

import pytest

from router.scoring import Candidate, RoundRobin, TierWeights, choose_kv, rank_by_cost, worker_cost


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
