"""The router's own copy of the block index, so a routing decision never leaves the process.

Fed by the kvstore's ``WatchIndex`` stream (a snapshot, then every applied batch), it keeps
for each model ``block hash → bit mask of the workers holding it`` (in any KV tier). A prefix
match walks the request's chain once, intersecting masks: one dict lookup and two integer
operations per block, whatever the number of workers, and it stops at the first block nobody
still in the running holds. Masks rather than sets of worker ids because most blocks have one
or two holders and a million small sets would cost the router hundreds of megabytes.

Tiers mirror the registry (``kvstore/registry.py``): per worker, a tier mask (bit 0 device,
1 host, 2 disk) is kept only for blocks held anywhere but *only* on the device; a matched
block held in a lower tier only is reported as a host or disk block, to be copied back rather
than recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmesh_proto.v1.kvstore_pb2 import KvEventBatch
from router.scoring import PrefixOverlap

_DEVICE, _HOST = 1, 2


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[str, dict[int, int]] = {}  # model -> block hash -> worker mask
        self._held: dict[str, set[int]] = {}  # worker id -> hashes held in any tier
        self._tiers: dict[str, dict[int, int]] = {}  # worker id -> hash -> tier mask, when not device-only
        self._model_of: dict[str, str] = {}
        self._bit: dict[str, int] = {}  # worker id -> its bit in the masks
        self._free_bits: list[int] = []
        self._worker_at: dict[int, str] = {}

    def clear(self) -> None:
        self.__init__()

    @property
    def blocks(self) -> int:
        """(worker, block) entries held, as the kvstore counts them."""
        return sum(len(hashes) for hashes in self._held.values())

    def apply(self, batch: KvEventBatch) -> None:
        """Replay one applied batch exactly as the kvstore's registry applied it."""
        worker = batch.worker_id
        if batch.resync:
            self._forget(worker)
            if not batch.model:  # the worker left the index
                return
        self._model_of.setdefault(worker, batch.model)
        for event in batch.events:
            kind = event.WhichOneof("event")
            if kind == "cleared":
                self._drop_blocks(worker)
            elif kind == "stored":
                self._change(worker, event.stored.block_hashes, 1 << event.stored.tier, store=True)
            elif kind == "removed":
                self._change(worker, event.removed.block_hashes, 1 << event.removed.tier, store=False)

    def overlaps(self, model: str, block_hashes: list[int]) -> dict[str, PrefixOverlap]:
        """Leading blocks of the chain each worker holds (workers with none left out)."""
        holders = self._holders.get(model)
        if not holders or not block_hashes:
            return {}
        matched: dict[str, int] = {}
        alive = holders.get(block_hashes[0], 0)
        position = 1
        for block_hash in block_hashes[1:]:
            if not alive:
                break
            still = alive & holders.get(block_hash, 0)
            if still != alive:
                self._record(alive & ~still, position, matched)
            alive = still
            position += 1
        self._record(alive, position, matched)
        return {worker: self._split(worker, block_hashes, n) for worker, n in matched.items()}

    def _split(self, worker: str, block_hashes: list[int], matched: int) -> PrefixOverlap:
        tiers = self._tiers.get(worker)
        if not tiers:
            return PrefixOverlap(matched)
        host = disk = 0
        for block_hash in block_hashes[:matched]:
            mask = tiers.get(block_hash, _DEVICE)
            if not mask & _DEVICE:
                if mask & _HOST:
                    host += 1
                else:
                    disk += 1
        return PrefixOverlap(matched, host, disk)

    def _record(self, mask: int, matched: int, result: dict[str, int]) -> None:
        while mask:
            low = mask & -mask
            result[self._worker_at[low.bit_length() - 1]] = matched
            mask ^= low

    def _bit_of(self, worker: str) -> int:
        bit = self._bit.get(worker)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else len(self._bit)
            self._bit[worker] = bit
            self._worker_at[bit] = worker
        return bit

    def _change(self, worker: str, block_hashes: Iterable[int], tier_bit: int, store: bool) -> None:
        """Add or take away one tier of each block; a block is held while any tier holds it."""
        model = self._model_of.get(worker)
        if model is None:  # the kvstore never applies events for a worker without a model
            return
        holders = self._holders.setdefault(model, {})
        held = self._held.setdefault(worker, set())
        tiers = self._tiers.setdefault(worker, {})
        bit = 1 << self._bit_of(worker)
        for block_hash in block_hashes:
            old = tiers.get(block_hash, _DEVICE) if block_hash in held else 0
            new = old | tier_bit if store else old & ~tier_bit
            if new == old:
                continue
            if not old:
                held.add(block_hash)
                holders[block_hash] = holders.get(block_hash, 0) | bit
            elif not new:
                held.discard(block_hash)
                self._unhold(holders, block_hash, bit)
            if new > _DEVICE:
                tiers[block_hash] = new
            else:
                tiers.pop(block_hash, None)

    @staticmethod
    def _unhold(holders: dict[int, int], block_hash: int, bit: int) -> None:
        remaining = holders[block_hash] & ~bit
        if remaining:
            holders[block_hash] = remaining
        else:
            del holders[block_hash]

    def _drop_blocks(self, worker: str) -> None:
        held = self._held.get(worker)
        if held:
            holders = self._holders[self._model_of[worker]]
            bit = 1 << self._bit[worker]
            for block_hash in held:
                self._unhold(holders, block_hash, bit)
            held.clear()
        self._tiers.pop(worker, None)

    def _forget(self, worker: str) -> None:
        self._drop_blocks(worker)
        self._held.pop(worker, None)
        self._model_of.pop(worker, None)
        bit = self._bit.pop(worker, None)
        if bit is not None:
            del self._worker_at[bit]
            self._free_bits.append(bit)
