"""The sending side of a KV transfer spread over several parallel streams.

One Python gRPC stream moves a fraction of what a link can carry (its framing runs on one
connection, one thread); several calls, each on its own connection, move more
(``bench/kv_transfer.py --streams``). The receiver opens them all with the same
``transfer_id``: stream 0 carries the request and is served as any pull; it deals chunk k to
stream k mod ``streams`` and sends its own share itself. Streams 1.. carry nothing else and
wait here for what they are dealt, ending when the transfer does. A stream that comes after its
share was dealt finds it waiting; a share nobody comes for is dropped after ``UNCLAIMED_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.worker.kv_wire import TransferError, WireChunk

MAX_STREAMS = 16
UNCLAIMED_S = 30.0


# Chunks dealt to a stream and not yet taken by it: the dealing waits for room beyond this many,
# so a slow stream paces the transfer (and the call that deals ends with it, not long before).
SHARE_DEPTH = 2


@dataclass
class _Share:
    """One stream's chunks (None ends them), whether its call has come for them and whether it
    has gone again (ended, failed or hung up: dealing it more fails the transfer)."""

    chunks: asyncio.Queue[WireChunk | None] = field(default_factory=lambda: asyncio.Queue(SHARE_DEPTH))
    claimed: bool = False
    gone: bool = False


class TransferStreams:
    """Shares of striped transfers, keyed by (transfer id, stream index); event-loop only."""

    def __init__(self) -> None:
        self._shares: dict[tuple[str, int], _Share] = {}
        self._ended: set[str] = set()  # transfers that ended out of order, for UNCLAIMED_S

    def __len__(self) -> int:
        return len(self._shares)

    def _share(self, transfer_id: str, index: int) -> _Share:
        return self._shares.setdefault((transfer_id, index), _Share())

    async def deal(self, chunks: AsyncIterator[WireChunk], transfer_id: str, streams: int,
                   keep_own: bool = True) -> AsyncIterator[WireChunk]:  # fmt: skip
        """Stream 0's side: yields its own share of ``chunks`` and hands the others theirs (with
        one stream, all of them are its own). Without ``keep_own`` (the chunks go on TCP
        connections, ``kv_tcp.py``) it yields nothing and deals them all, to shares 1..``streams``."""
        streams, first = max(streams, 1), 0 if keep_own else 1
        shares = [self._share(transfer_id, index) for index in range(1, streams + first)]
        ended = False
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    index = chunk.header.chunk_index % streams + first
                    if not index:
                        yield chunk
                        continue
                    share = shares[index - 1]
                    if share.gone:  # its stream or connection went away: the transfer cannot complete
                        raise TransferError(f"stream {index} of transfer {transfer_id} went away")
                    await share.chunks.put(chunk)
            for share in shares:
                await share.chunks.put(None)
            ended = True
        finally:
            if not ended:
                self.end(transfer_id, len(shares))
            elif shares:
                asyncio.get_running_loop().call_later(UNCLAIMED_S, self._drop_unclaimed, transfer_id, len(shares))

    def end(self, transfer_id: str, shares: int) -> None:
        """End shares 1..``shares`` of a transfer that did not end in order (failed, cancelled, or
        never dealt): what they still hold is dropped and their streams end; a stream that comes
        later (within ``UNCLAIMED_S``) ends at once."""
        for index in range(1, shares + 1):
            share = self._shares.get((transfer_id, index))
            if share is not None and share.claimed:
                _drain(share)
                share.chunks.put_nowait(None)
            elif share is not None:
                del self._shares[(transfer_id, index)]
        self._ended.add(transfer_id)  # a stream that comes later finds it over
        asyncio.get_running_loop().call_later(UNCLAIMED_S, self._ended.discard, transfer_id)

    async def follow(self, transfer_id: str, index: int) -> AsyncIterator[WireChunk]:
        """Stream ``index``'s side (1..): the chunks dealt to it, until the transfer ends."""
        if transfer_id in self._ended:
            return
        share = self._share(transfer_id, index)
        if share.claimed:
            raise TransferError(f"stream {index} of transfer {transfer_id} is being read already")
        share.claimed = True
        try:
            while (chunk := await share.chunks.get()) is not None:
                yield chunk
        finally:
            share.gone = True
            _drain(share)  # a deal waiting for room in it goes on, and finds it gone
            self._shares.pop((transfer_id, index), None)

    def _drop_unclaimed(self, transfer_id: str, shares: int) -> None:
        for index in range(1, shares + 1):
            share = self._shares.get((transfer_id, index))
            if share is not None and not share.claimed:
                del self._shares[(transfer_id, index)]


def _drain(share: _Share) -> None:
    while not share.chunks.empty():
        share.chunks.get_nowait()
