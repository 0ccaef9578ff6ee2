"""Bad input gets a clear ValueError, and the engine keeps serving."""

import pytest

from services.engine import Engine, EngineConfig, SamplingParams


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logprobs": 99}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_are_rejected_and_the_engine_still_works(engine: Engine, tokenizer):
    ok = SamplingParams(temperature=0, max_tokens=4)
    before = engine.stats()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], ok)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("too-long", [42] * engine.max_model_len, ok)
    with pytest.raises(ValueError, match="unknown token id 49152"):
        engine.add_request("oov", [1, 2, 49152], ok)
    with pytest.raises(ValueError, match="unknown token id -1"):
        engine.add_request("negative", [1, -1], ok)
    with pytest.raises(ValueError, match="integers"):
        engine.add_request("floats", [1.5, 2.0], ok)
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request("no-params", [1, 2], {"max_tokens": 3})
    assert not engine.has_unfinished()
    assert engine.stats().blocks_used == before.blocks_used == 0

    engine.add_request("dup", tokenizer.encode("Hello"), ok)
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request("dup", tokenizer.encode("Hello"), ok)
    engine.abort("dup")

    (out,) = engine.generate([tokenizer.encode("The capital of Italy is")], ok)
    assert len(out.new_token_ids) == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "float16"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"block_size": 12}, "block_size"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 4}, "max_num_batched_tokens"),
])
def test_bad_engine_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
