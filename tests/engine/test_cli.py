"""``kvmesh generate``: prints real SmolLM2 text for a prompt."""

from services.engine.cli import build_parser, generate_main, run_generate
from services.engine.sampling_params import SamplingParams


def test_generate_prints_the_answer(engine, capsys):
    args = build_parser().parse_args(["What is the capital of France?", "--max-tokens", "12", "--stats"])
    assert run_generate(engine, args, SamplingParams(temperature=0, max_tokens=12)) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "prompt tokens" in captured.err


def test_bad_flags_exit_with_status_2(capsys):
    assert generate_main(["hi", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
