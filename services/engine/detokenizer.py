"""Incremental detokenization that never emits half a character.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; decoding it
alone gives U+FFFD. We decode a short window (``prefix_offset:``) and release only the text
past what the window's earlier part already produced, holding back while the tail is U+FFFD.
The window starts a few prompt tokens back so tokenizers that strip a leading space
(SentencePiece) still see the context they need.
"""

from __future__ import annotations

from collections.abc import Callable

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_token_ids: list[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text (possibly empty)."""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence, release whatever is held back (replacement chars included)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta
