"""Stop strings on streamed text: nothing after the stop is sent, nothing before it is lost."""

from __future__ import annotations

from router.text_stream import StopStringFilter


def feed(stop: list[str], pieces: list[str]) -> tuple[str, bool]:
    stops = StopStringFilter(stop)
    sent = "".join(stops.push(piece) for piece in pieces)
    if not stops.stopped:
        sent += stops.flush()
    return sent, stops.stopped


def test_text_ends_before_a_stop_string_split_across_pieces():
    assert feed(["END"], ["Hello E", "N", "D and more"]) == ("Hello ", True)


def test_a_tail_that_only_looked_like_a_stop_is_released():
    assert feed(["END"], ["Hello E", "N", "d"]) == ("Hello ENd", False)


def test_earliest_of_several_stops_wins_and_no_stop_passes_everything():
    assert feed(["b", "a"], ["xxab"]) == ("xx", True)
    assert feed([], ["plain ", "text"]) == ("plain text", False)
