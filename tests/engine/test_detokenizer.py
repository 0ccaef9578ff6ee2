"""Incremental detokenization never splits a multi-byte character, and matches a full decode."""

from services.engine.tokenizer import Tokenizer

TEXTS = ["naïve café — 你好，世界 🎉🎉 done", "emoji 👩‍👩‍👧 and 日本語のテキスト", "plain ascii, spaces  and\nnewlines"]


def test_token_by_token_equals_full_decode(tokenizer: Tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        detok = tokenizer.detokenizer([])
        pieces = [detok.add([t]) for t in ids]
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_characters_split_across_tokens_are_held_back(tokenizer: Tokenizer):
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1, "the emoji should need several byte-level tokens"
    detok = tokenizer.detokenizer(tokenizer.encode("Party "))
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🎉"


def test_chat_template_renders_the_models_format(tokenizer: Tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids == [2]
