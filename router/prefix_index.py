"""The router's own copy of the block index, so a routing decision never leaves the process.

Fed by the kvstore's ``WatchIndex`` stream (a snapshot, then every applied batch), it keeps
for each model ``block hash → bit mask of the workers holding it``. A prefix match walks the
request's chain once, intersecting masks: one dict lookup and two integer operations per
block, whatever the number of workers, and it stops at the first block nobody still in the
running holds. Masks rather than sets of worker ids because most blocks have one or two
holders and a million small sets would cost the router hundreds of megabytes.

Only device-tier blocks count (events of lower tiers are ignored): a block on a worker's host
memory or disk is not a prefix the worker can run from without copying it back first.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmesh_proto.v1.kvstore_pb2 import KvEventBatch


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[str, dict[int, int]] = {}  # model -> block hash -> worker mask
        self._held: dict[str, set[int]] = {}  # worker id -> hashes (to clear a worker)
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
            elif kind == "stored" and event.stored.tier == 0:
                self._store(worker, event.stored.block_hashes)
            elif kind == "removed" and event.removed.tier == 0:
                self._remove(worker, event.removed.block_hashes)

    def overlaps(self, model: str, block_hashes: list[int]) -> dict[str, int]:
        """Leading blocks of the chain each worker holds (workers with none left out)."""
        holders = self._holders.get(model)
        if not holders or not block_hashes:
            return {}
        result: dict[str, int] = {}
        alive = holders.get(block_hashes[0], 0)
        position = 1
        for block_hash in block_hashes[1:]:
            if not alive:
                break
            still = alive & holders.get(block_hash, 0)
            if still != alive:
                self._record(alive & ~still, position, result)
            alive = still
            position += 1
        self._record(alive, position, result)
        return result

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

    def _store(self, worker: str, block_hashes: Iterable[int]) -> None:
        model = self._model_of.get(worker)
        if model is None:  # the kvstore never applies stores for a worker without a model
            return
        holders = self._holders.setdefault(model, {})
        held = self._held.setdefault(worker, set())
        mask = 1 << self._bit_of(worker)
        for block_hash in block_hashes:
            holders[block_hash] = holders.get(block_hash, 0) | mask
            held.add(block_hash)

    def _remove(self, worker: str, block_hashes: Iterable[int]) -> None:
        held = self._held.get(worker)
        model = self._model_of.get(worker)
        if not held or model is None:
            return
        holders = self._holders[model]
        keep = ~(1 << self._bit[worker])
        for block_hash in block_hashes:
            if block_hash in held:
                held.discard(block_hash)
                remaining = holders[block_hash] & keep
                if remaining:
                    holders[block_hash] = remaining
                else:
                    del holders[block_hash]

    def _drop_blocks(self, worker: str) -> None:
        if self._held.get(worker):
            self._remove(worker, list(self._held[worker]))

    def _forget(self, worker: str) -> None:
        self._drop_blocks(worker)
        self._held.pop(worker, None)
        self._model_of.pop(worker, None)
        bit = self._bit.pop(worker, None)
        if bit is not None:
            del self._worker_at[bit]
            self._free_bits.append(bit)
