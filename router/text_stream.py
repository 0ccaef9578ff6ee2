"""Turning a worker's token stream into text the client can trust.

Stop strings are enforced here, on text, because only text shows them: the output ends
*before* the first stop string, and while a stream's tail could still grow into one,
that tail is held back instead of sent and then regretted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class StopStringFilter:
    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return what may be sent now."""
        if self.stopped:
            return ""
        self.text += delta
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out = self.text[self.sent : cut]
            self.text = self.text[:cut]
            self.sent = cut
            return out
        safe = len(self.text) - self._hold if self.stop else len(self.text)
        if safe <= self.sent:
            return ""
        out = self.text[self.sent : safe]
        self.sent = safe
        return out

    def flush(self) -> str:
        """At the end of the stream nothing can grow into a stop string any more."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _first_stop(self) -> int | None:
        start = max(self.sent - self._hold, 0)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None


class Detokenizer(Protocol):
    def add(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class TextStream:
    """Incremental detokenization plus stop strings, for one request."""

    def __init__(self, detokenizer: Detokenizer, stop: Sequence[str]) -> None:
        self._detokenizer = detokenizer
        self.stops = StopStringFilter(stop)

    def push(self, token_ids: list[int]) -> str:
        return self.stops.push(self._detokenizer.add(token_ids))

    def finish(self) -> str:
        return self.stops.push(self._detokenizer.flush()) + self.stops.flush()

    @property
    def stopped(self) -> bool:
        return self.stops.stopped
