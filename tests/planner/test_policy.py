"""The planner's decision, on synthetic metric windows: which pool is short, what is moved,
and that a steady load near a threshold gives at most one decision per cooldown."""

from __future__ import annotations

import itertools

import pytest

from planner.capacity import CapacityModel
from planner.metrics_source import MetricWindow, WorkerLoad
from planner.policy import Policy, Targets
from planner.predictor import HoltTrend, LoadForecast, LoadPredictor
from services.engine.timing_model import TimingProfile

TTFT_S, ITL_S = 2.0, 0.1


def policy(cooldown_s: float = 30.0, min_workers: int = 2, max_workers: int = 8) -> Policy:
    targets = Targets(TTFT_S, ITL_S, hysteresis=0.2, cooldown_s=cooldown_s, min_workers=min_workers,
                      max_workers=max_workers)  # fmt: skip
    return Policy(targets, CapacityModel(TimingProfile.load("cpu-smollm2"), 0.7, ITL_S, ttft_target_s=TTFT_S))


def window(prefill: int, decode: int, ttft: float | None, itl: float | None, prefill_waiting: int = 0,
           prefill_running: int = 0) -> MetricWindow:  # fmt: skip
    workers = [WorkerLoad(f"p{i}", "prefill", f"h:{i}", 100 + i, running=prefill_running,
                          waiting=prefill_waiting if i == 0 else 0) for i in range(prefill)]  # fmt: skip
    workers += [WorkerLoad(f"d{i}", "decode", f"h:{50 + i}", 200 + i, running=i % 2) for i in range(decode)]
    return MetricWindow(0.0, ttft_p90_s=ttft, itl_p90_s=itl, workers=workers)


IDLE = LoadForecast(0.0, 0.0, 0.0)
LONG_PROMPTS = LoadForecast(0.8, 1500.0, 16.0)  # prefill-heavy
LONG_ANSWERS = LoadForecast(4.0, 300.0, 400.0)  # decode-heavy


def test_slow_first_tokens_with_a_prefill_queue_take_a_worker_from_an_idle_decode_pool():
    d = policy().decide(window(2, 4, ttft=5.0, itl=0.03, prefill_waiting=6), LoadForecast(0.2, 1000, 16), 100.0)
    assert d is not None and (d.action, d.role) == ("switch", "prefill")
    assert d.worker_ids[0] == "d0"  # the least loaded decode worker first
    assert "TTFT p90 5000 ms > target 2000 ms" in d.reason


def test_slow_tokens_take_a_worker_from_a_comfortable_prefill_pool():
    d = policy().decide(window(4, 2, ttft=0.4, itl=0.25), LoadForecast(0.05, 300, 200), 100.0)
    assert d is not None and (d.action, d.role, d.worker_ids[0]) == ("switch", "decode", "p0")
    assert "ITL p90 250 ms > target 100 ms" in d.reason


def test_slow_first_tokens_of_short_prompts_are_the_decode_pools_shortage():
    """Short prompts are prefilled on their decode worker: more prefill workers would not help."""
    d = policy().decide(window(3, 2, ttft=3.0, itl=0.05), LoadForecast(0.1, 60, 100), 100.0)
    assert d is not None and (d.action, d.role) == ("switch", "decode")


def test_the_forecast_alone_moves_a_worker_before_latency_degrades():
    d = policy().decide(window(2, 6, ttft=0.5, itl=0.05), LONG_PROMPTS, 100.0)
    assert d is not None and (d.action, d.role) == ("switch", "prefill")
    assert "forecast" in d.reason


def test_a_pool_near_its_target_does_not_give_a_worker_away():
    """ITL is under target but inside the hysteresis band: decode keeps its workers, so a
    prefill shortage is met by adding a worker instead."""
    d = policy().decide(window(2, 3, ttft=5.0, itl=0.09, prefill_running=3), LoadForecast(0.1, 1000, 16), 100.0)
    assert d is not None and (d.action, d.role) == ("add", "prefill")


def test_slow_tokens_from_prompts_spilled_onto_decode_workers_are_the_prefill_pools_shortage():
    """Prefill workers have a queue, so the router prefills long prompts on decode workers, whose
    streams stall: more decode workers would not help, more prefill workers would."""
    d = policy().decide(window(2, 6, ttft=5.0, itl=0.4, prefill_waiting=8), LoadForecast(0.2, 1000, 16), 100.0)
    assert d is not None and (d.action, d.role) == ("switch", "prefill")


def test_both_pools_short_at_the_cap_changes_nothing():
    assert policy(max_workers=6).decide(window(3, 3, ttft=5.0, itl=0.3, prefill_waiting=4), LONG_ANSWERS, 1) is None


def test_both_pools_short_below_the_cap_adds_a_worker():
    d = policy(max_workers=8).decide(window(3, 3, ttft=5.0, itl=0.3, prefill_waiting=4), LONG_ANSWERS, 1.0)
    assert d is not None and d.action == "add"


def test_an_idle_mesh_gives_workers_back_down_to_the_minimum():
    p = policy(cooldown_s=0.0, min_workers=2)
    d = p.decide(window(2, 2, ttft=None, itl=None), IDLE, 1.0)
    assert d is not None and d.action == "remove"
    assert p.decide(window(1, 1, ttft=None, itl=None), IDLE, 2.0) is None


def test_nothing_changes_when_targets_are_met_at_the_minimum_size():
    assert policy(min_workers=6).decide(window(3, 3, ttft=1.0, itl=0.05), LoadForecast(0.1, 500, 50), 1.0) is None


def test_a_steady_load_near_the_threshold_gives_at_most_one_decision_per_cooldown():
    """TTFT wobbles around its target tick after tick (±10%); the other pool is comfortable."""
    p = policy(cooldown_s=30.0)
    times, prefill = [], 3
    for tick in range(120):  # 2 s ticks, 240 s
        now = tick * 2.0
        ttft = TTFT_S * (1.1 if tick % 2 else 0.9)
        d = p.decide(window(prefill, 8 - prefill, ttft=ttft, itl=0.05, prefill_waiting=2),
                     LoadForecast(0.1, 1000, 16), now)  # fmt: skip
        if d is not None:
            times.append(now)
            prefill += len(d.worker_ids) if d.action == "switch" and d.role == "prefill" else 0
    assert times, "a TTFT over target should move a worker"
    assert all(b - a >= 30.0 for a, b in itertools.pairwise(times))


def test_a_pool_far_short_gets_several_workers_in_one_decision():
    """120 sequences decoding on 2 workers that hold ~15 rows each under the ITL target: the
    prefill pool, idle, gives all it can spare at once (it keeps one worker)."""
    busy = window(6, 2, ttft=0.3, itl=0.3)
    for worker in busy.pool("decode"):
        worker.running = 60
    d = policy().decide(busy, LoadForecast(0.0, 300, 0), 1.0)
    assert d is not None and (d.action, d.role, len(d.worker_ids)) == ("switch", "decode", 5)
    assert len(set(d.worker_ids)) == 5 and all(w.startswith("p") for w in d.worker_ids)


def test_a_move_is_not_undone_by_the_next_look():
    """After decode gave prefill a worker, a comfortable TTFT does not send it back: prefill
    would only give one away when the forecast says it can spare it, and it cannot."""
    p = policy(cooldown_s=0.0)
    forecast = LoadForecast(0.6, 1000, 16)  # needs about 3.9 prefill workers
    first = p.decide(window(3, 5, ttft=4.0, itl=0.03, prefill_waiting=5), forecast, 1.0)
    assert first is not None and (first.action, first.role) == ("switch", "prefill")
    again = p.decide(window(4, 4, ttft=0.8, itl=0.03), forecast, 2.0)
    assert again is None or again.role != "decode"


def test_capacity_needs_follow_prompt_and_answer_lengths():
    model = CapacityModel(TimingProfile.load("cpu-smollm2"), 0.7, ITL_S)
    long_prompts, long_answers = model.needs(LONG_PROMPTS), model.needs(LONG_ANSWERS)
    assert long_prompts.prefill > long_prompts.decode
    assert long_answers.decode > long_answers.prefill
    assert model.needs(LoadForecast(1.0, 100, 10)).prefill == 0.0  # short prompts stay on decode workers
    assert CapacityModel(TimingProfile.load("cpu-smollm2"), 0.7, 0.01).decode_workers(LONG_ANSWERS) == float("inf")


def test_holt_forecasts_a_rising_load_ahead_of_its_level():
    series = HoltTrend(0.5, 0.3)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        series.update(value)
    assert series.forecast(3) > series.level > 3.0
    flat = HoltTrend(0.5, 0.3)
    for _ in range(20):
        flat.update(2.0)
    assert flat.forecast(10) == pytest.approx(2.0, abs=1e-3)


def test_the_predictor_keeps_lengths_over_idle_ticks():
    predictor = LoadPredictor(0.5, 0.3)
    predictor.observe(MetricWindow(0.0, request_rate=2.0, mean_prompt_tokens=800, mean_output_tokens=20))
    predictor.observe(MetricWindow(1.0, request_rate=0.0))
    forecast = predictor.forecast(1)
    assert forecast.prompt_tokens == pytest.approx(800) and forecast.request_rate < 2.0


def test_sequences_decoding_now_count_before_the_router_sees_them_finish():
    """Long answers finish a minute after they start: the decode pool's own running count shows
    the load long before the router's counters do."""
    busy = window(4, 4, ttft=0.5, itl=0.08)
    for worker in busy.pool("decode"):
        worker.running = 40
    d = policy().decide(busy, LoadForecast(0.0, 300, 0), 1.0)
    assert d is not None and (d.action, d.role) == ("switch", "decode")
    assert "needs" in d.reason


def test_a_prefill_pool_with_work_on_every_worker_keeps_them_whatever_the_forecast():
    """The forecast lags (requests are counted when they end): busy prefill workers stay."""
    d = policy().decide(window(3, 2, ttft=0.5, itl=0.3, prefill_running=1), LoadForecast(0.0, 300, 128), 1.0)
    assert d is not None and (d.action, d.role) == ("add", "decode")


def test_a_prefill_backlog_asks_for_the_workers_that_clear_it_within_the_ttft_target():
    model = CapacityModel(TimingProfile.load("cpu-smollm2"), 1.0, ITL_S, ttft_target_s=TTFT_S)
    quiet = LoadForecast(0.0, 1000, 16)  # the router has seen nothing finish yet
    assert model.needs(quiet, prefilling=0).prefill == 0.0
    backlog = model.needs(quiet, prefilling=12).prefill
    assert backlog == pytest.approx(12 * model.prefill_seconds(1000) / TTFT_S)
