"""The mock engine (``--engine mock``): the real scheduler, block manager and KV events around
a timed stand-in for the model, and a timing model that tracks the real engine."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
import torch

from services.engine import Engine, SamplingParams
from services.engine.calibrate import Shape, gpu_report_profile, measure
from services.engine.config import EngineConfig
from services.engine.timing_model import StepShape, TimingProfile, fit_coefficients

# A small pool (24 blocks of 16 tokens), so a few short prompts overflow it and blocks are evicted.
SMALL_POOL = {"num_kv_blocks": 24, "max_num_seqs": 4, "max_num_batched_tokens": 256}


@pytest.fixture(scope="module")
def mock_engine() -> Engine:
    return Engine(EngineConfig(engine="mock", mock_profile="h100-llama3-8b", **SMALL_POOL))


def _events_of(engine: Engine, waves: list[list[list[int]]], sampling: SamplingParams) -> list[tuple[str, tuple]]:
    """Every KV event, as (kind, hashes), while the waves are served one after another."""
    engine.reset_prefix_cache()
    seen: list[tuple[str, tuple]] = []

    def record(seq: int, events: list) -> None:
        seen.extend((type(e).__name__, tuple(getattr(e, "block_hashes", ()))) for e in events)

    engine.set_kv_event_callback(record)
    try:
        for wave in waves:
            engine.generate(wave, sampling)
    finally:
        engine.set_kv_event_callback(None)
        engine.reset_prefix_cache()
    return seen


def test_mock_and_real_engines_emit_the_same_kv_events(mock_engine: Engine):
    """Same requests, same pool: same BlockStored/BlockRemoved hashes in the same order.

    Prompts are 16k+1 tokens and decode 8 tokens, so every named block holds prompt tokens
    only (the two engines' generated tokens differ by design). Shared prefixes make later
    requests hit the cache; the pool is too small for every wave, so blocks are evicted, and
    the evictions must match too."""
    real_engine = Engine(EngineConfig(dtype="float32", **SMALL_POOL))
    rng = random.Random(7)
    shared = [rng.randrange(1000, 40000) for _ in range(96)]
    waves = [
        [shared + [rng.randrange(1000, 40000) for _ in range(33)] for _ in range(2)],
        [shared[:64] + [rng.randrange(1000, 40000) for _ in range(k)] for k in (17, 49)],
        [[rng.randrange(1000, 40000) for _ in range(177)]],
        [shared + [rng.randrange(1000, 40000) for _ in range(17)]],
    ]
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    real = _events_of(real_engine, waves, sampling)
    mock = _events_of(mock_engine, waves, sampling)
    assert [kind for kind, _ in real].count("BlockRemoved") > 0, "the waves should overflow the pool"
    assert mock == real


def test_mock_output_depends_only_on_the_tokens(mock_engine: Engine):
    """Equal requests give equal output whether their prefix was cached or not; other prompts differ."""
    rng = random.Random(3)
    prompt = [rng.randrange(1000, 40000) for _ in range(100)]
    other = [*prompt[:-1], prompt[-1] + 1]
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    mock_engine.reset_prefix_cache()
    (cold,) = mock_engine.generate([prompt], sampling)
    (warm, different) = mock_engine.generate([prompt, other], sampling)
    assert warm.num_cached_tokens == 96 and cold.num_cached_tokens == 0
    assert warm.new_token_ids == cold.new_token_ids
    assert different.new_token_ids != cold.new_token_ids
    assert len(set(cold.new_token_ids)) > 10


def test_fit_recovers_known_coefficients():
    truth = {"base": 0.002, "per_decode_seq": 1e-4, "per_decode_context_token": 2e-7, "per_prefill_token": 5e-5,
             "per_prefill_attention_pair": 1e-9}  # fmt: skip
    profile = TimingProfile("truth", "test", "", truth)
    shapes = [StepShape(b, b * c, 0, 0) for b in (1, 4, 16) for c in (64, 512)]
    shapes += [StepShape(0, 0, n, n * c + n * n // 2) for n in (64, 256, 1024) for c in (0, 512)]
    fitted = fit_coefficients((s, profile.predict(s)) for s in shapes)
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=1e-6)


@pytest.mark.slow
def test_h100_profile_is_fitted_to_the_measured_gpu_timings():
    """The shipped H100 profile is the fit of the raw timings the GPU engine measured on an H100
    (bench/profiles/h100-measured-raw.json), and it predicts every measured point within 25%."""
    report = Path(__file__).parents[2] / "bench" / "profiles" / "h100-measured-raw.json"
    fitted = gpu_report_profile("h100-llama3-8b-measured", report, "random:llama-3-8b")
    shipped = TimingProfile.load("h100-llama3-8b-measured")
    assert shipped.source == "measured"
    assert shipped.coefficients == pytest.approx(fitted.coefficients)
    assert fitted.meta["points"] >= 20 and fitted.meta["max_abs_error"] < 0.25


def test_timing_model_predicts_the_real_engine_within_25_percent(engine: Engine):
    """Fit a profile now, on this machine's load (not the shipped profile), then compare its
    predictions with re-measured runs of two of the calibrated shapes. Calibration and checks
    are interleaved round by round, so a change in the shared machine's load hits both alike;
    medians of the rounds are compared. One torch thread, as the shipped CPU profile was measured:
    with two, every op ends in a barrier that any other process on the machine (the session's
    idle mesh included) stretches, and the step times stop being a function of the shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_predictions(engine)
    finally:
        torch.set_num_threads(threads)


def _check_predictions(engine: Engine) -> None:
    shapes = [Shape(16), Shape(64), Shape(32, cached_tokens=64), Shape(8, decode_steps=4),
              Shape(8, batch=4, decode_steps=4)]  # fmt: skip
    checks = (Shape(64), Shape(8, batch=4, decode_steps=4))
    rng = random.Random(11)
    measure(engine, Shape(16), 2, rng)  # warm-up
    samples: list = []
    checked: dict[Shape, list] = {shape: [] for shape in checks}
    for _ in range(3):
        for shape in shapes:
            samples += measure(engine, shape, 1, rng)
        for shape in checks:
            checked[shape] += [(s, t) for s, t in measure(engine, shape, 1, rng) if shape.matches(s)]
    profile = TimingProfile("session", "measured", "", fit_coefficients(samples))
    for shape, steps in checked.items():
        measured = statistics.median(t for _, t in steps)
        predicted = statistics.median(profile.predict(s) for s, _ in steps)
        assert predicted == pytest.approx(measured, rel=0.25), (shape, measured, predicted)
