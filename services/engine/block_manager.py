"""The paged KV pool's bookkeeping: which block holds what, who uses it, what may be evicted.

Blocks are refcounted. A full, computed block is named by its chained hash and stays in
``hash_to_block`` after its last user leaves (cached, evictable, least-recently-freed first),
so a later request with the same prefix reuses it without recomputing. Only the pool's
owner (the engine) touches the tensors; this class only moves integers.

With lower tiers (``kv_tiers.LowerTiers``), a named block is demoted there when its pool
slot is reused, and a prefix match that runs out of pool blocks continues through them,
promoting each block it finds back into the pool (the tiers copy the bytes). Host-memory
blocks are copied at once; disk blocks are read in the background into pool blocks the
sequence already holds but that stay unnamed until ``finish_promotion``, so no other
sequence can match a block whose bytes are not in yet, and freeing the sequence meanwhile
(an abort) returns them like any unnamed block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from kvmesh.hashing import block_hash
from services.engine.kv_events import BlockRemoved, BlockStored, KvEvent
from services.engine.kv_tiers import TIER_HOST, LowerTiers
from services.engine.sequence import Sequence


class Block:
    __slots__ = ("block_hash", "block_id", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None


@dataclass
class Promotion:
    """Disk blocks being read for a sequence, into the pool blocks it holds for them.

    ``chain`` holds the hashes of the sequence's blocks from ``start`` on (its pool hits and
    host copies among them are in place already); ``disk`` the positions in ``chain`` being read.
    """

    start: int
    chain: list[int]
    disk: list[int]
    loaded: Future

    @property
    def done(self) -> bool:
        return self.loaded.done()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 tiers: LowerTiers | None = None) -> None:
        self.block_size = block_size
        self.tiers = tiers if enable_prefix_caching else None
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_to_block: dict[int, int] = {}
        # Unused and unnamed: taken first.
        self.empty: deque[int] = deque(range(num_blocks))
        # Unused but named (reusable): evicted in insertion order, i.e. least recently freed first.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.pending_events: list[KvEvent] = []
        self.prefix_hit_tokens = 0

    # --- accounting -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (empty or evictable)."""
        return len(self.empty) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        """Unused blocks that still hold a named prefix."""
        return len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def cached_block_hashes(self) -> list[int]:
        """Every hash this pool can serve now (in use or evictable), for a full resync."""
        return list(self.hash_to_block)

    def lower_tier_hashes(self) -> dict[int, list[int]]:
        """Hashes held per lower tier (none without tiers), for a full resync."""
        return self.tiers.held() if self.tiers is not None else {}

    # --- allocation -------------------------------------------------------------------------
    def _take(self) -> int:
        if self.empty:
            block_id = self.empty.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block[block.block_hash]
            self.pending_events.append(BlockRemoved((block.block_hash,)))
            if self.tiers is not None:
                self.tiers.demote(block.block_hash, block_id)
            block.block_hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self.evictable[block_id] = None
            else:
                self.empty.append(block_id)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence, from_disk: bool = True) -> Promotion | None:
        """Attach the longest run of cached leading blocks to a sequence that holds none.

        At least one token is always left to compute: its logits give the next token. When the
        run continues on disk, the blocks for it are attached too and their reads started: the
        sequence may run only after ``finish_promotion`` (the returned promotion). Without
        ``from_disk`` the run stops at the first block only the disk holds.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return None
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent: int | None = None
        hashes: list[int] = []
        for i in range(max_blocks):
            h = block_hash(seq.token_ids[i * bs : (i + 1) * bs], parent)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            hashes.append(h)
            parent = h
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hashes) * bs
        if self.tiers is None or len(hashes) == max_blocks:
            return None
        return self._promote_chain(seq, max_blocks, from_disk)

    def _promote_chain(self, seq: Sequence, max_blocks: int, from_disk: bool) -> Promotion | None:
        """Continue a match through the lower tiers (and the pool, where a later block is back in
        it) until the chain breaks or the pool has no free block. Host blocks are copied and
        named now; disk blocks get a pool block each and are read in the background."""
        bs = self.block_size
        start = len(seq.block_hashes)
        chain: list[int] = []
        disk: list[int] = []
        h = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(start, max_blocks):
            parent, h = h, block_hash(seq.token_ids[i * bs : (i + 1) * bs], h)
            tier = self.tiers.tier_of(h)
            if h in self.hash_to_block:
                self._ref(self.hash_to_block[h])
                seq.block_table.append(self.hash_to_block[h])
            elif tier is None or not self.num_free or (tier != TIER_HOST and not from_disk):
                break
            else:
                block_id = self._take()
                seq.block_table.append(block_id)
                if tier == TIER_HOST:
                    self.tiers.promote_host(h, block_id)
                    self._name(block_id, h, parent)
                else:
                    disk.append(len(chain))
            chain.append(h)
        # Taking blocks above may have pushed a disk block of this chain out of the disk tier:
        # the chain stops before the first one no longer there.
        gone = next((p for p in disk if chain[p] not in self.tiers.disk), None) if disk else None
        if gone is not None:
            self._release_tail(seq, start + gone)
            chain, disk = chain[:gone], [p for p in disk if p < gone]
        if not disk:
            self._keep_chain(seq, chain)
            return None
        return Promotion(start, chain, disk, self.tiers.start_disk_load([chain[p] for p in disk]))

    def finish_promotion(self, seq: Sequence, promotion: Promotion) -> None:
        """Copy a promotion's disk reads into the sequence's pool blocks (waits for them if they
        are not in yet) and name them. The sequence keeps its chain up to the first block that
        was unusable; the blocks after it stay cached (each one's hash names its bytes) but are
        no longer the sequence's."""
        ids = [seq.block_table[promotion.start + p] for p in promotion.disk]
        usable = self.tiers.finish_disk_load([promotion.chain[p] for p in promotion.disk],
                                             promotion.loaded.result(), ids)
        for p, block_id, ok in zip(promotion.disk, ids, usable, strict=True):
            if ok:
                index = promotion.start + p
                self._name(block_id, promotion.chain[p], promotion.chain[p - 1] if p else (
                    seq.block_hashes[index - 1] if index else None))
        bad = next((p for p, ok in zip(promotion.disk, usable, strict=True) if not ok), None)
        kept = promotion.chain if bad is None else promotion.chain[:bad]
        if bad is not None:
            self._release_tail(seq, promotion.start + bad)
        self._keep_chain(seq, kept)

    def _name(self, block_id: int, h: int, parent: int | None) -> None:
        """Name a block whose bytes are in place (unless another block has that name already)."""
        if h in self.hash_to_block:
            return
        self.blocks[block_id].block_hash = h
        self.hash_to_block[h] = block_id
        self.pending_events.append(BlockStored((h,), parent))

    def _keep_chain(self, seq: Sequence, chain: list[int]) -> None:
        seq.block_hashes = seq.block_hashes + chain
        seq.num_computed_tokens = len(seq.block_hashes) * self.block_size

    def _release_tail(self, seq: Sequence, keep: int) -> None:
        """Drop a sequence's blocks from ``keep`` on (tail first, as ``free`` does)."""
        for block_id in reversed(seq.block_table[keep:]):
            self._unref(block_id)
        del seq.block_table[keep:]

    def add_cached(self, hashes: list[int], parent: int | None) -> list[int | None]:
        """Name pool blocks for a chain whose KV came from elsewhere (a peer), as cached blocks;
        for each hash, the block to fill (None: the pool has it already). Stops short when the
        pool has no free block. The caller writes the blocks before the next step reads them."""
        taken: list[int | None] = []
        for h in hashes:
            if h in self.hash_to_block:
                taken.append(None)
                continue
            if not self.num_free:
                break
            taken.append(self._take())
        # Named only once all are taken, so no take above evicts a block just named.
        for h, block_id in zip(hashes, taken, strict=False):
            if block_id is not None:
                block = self.blocks[block_id]
                block.block_hash, block.ref_count = h, 0
                self.hash_to_block[h] = block_id
                self.evictable[block_id] = None
        if taken:
            self.pending_events.append(BlockStored(tuple(hashes[: len(taken)]), parent))
        return taken

    def held_prefix_length(self, token_ids: list[int]) -> int:
        """Leading full blocks of ``token_ids`` held in the pool or a lower tier (read-only)."""
        return self._leading_blocks(token_ids, lambda h: h in self.hash_to_block or (
            self.tiers is not None and self.tiers.tier_of(h) is not None))

    def cached_prefix_length(self, token_ids: list[int]) -> int:
        """How many leading full blocks of ``token_ids`` this pool holds now (read-only)."""
        return self._leading_blocks(token_ids, self.hash_to_block.__contains__)

    def _leading_blocks(self, token_ids: list[int], held: Callable[[int], bool]) -> int:
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent: int | None = None
        count = 0
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(token_ids[i * bs : (i + 1) * bs], parent)
            if not held(parent):
                break
            count += 1
        return count

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens; False (nothing changed) if the pool is short."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def commit(self, seq: Sequence) -> None:
        """Name the blocks ``seq`` just filled, so later requests can reuse them (emits BlockStored)."""
        first = len(seq.block_hashes)
        new = seq.extend_block_hashes()
        if not new or not self.enable_prefix_caching:
            return
        stored: list[int] = []
        for i, h in enumerate(new, start=first):
            block = self.blocks[seq.block_table[i]]
            if h in self.hash_to_block:
                # Another sequence computed the same block at the same time; keep one named copy.
                continue
            block.block_hash = h
            self.hash_to_block[h] = block.block_id
            stored.append(h)
        if stored:
            parent_index = first - 1
            parent = seq.block_hashes[parent_index] if parent_index >= 0 else None
            # A skipped duplicate breaks contiguity only in which physical block is named; the
            # chain itself is unchanged, so one event with the first new block's parent is exact.
            self.pending_events.append(BlockStored(tuple(new), parent))

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (named ones stay cached until evicted)."""
        # Tail blocks first, so the LRU evicts a prefix's end before its start.
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def clear_cache(self) -> int:
        """Forget every unused named block (emits BlockRemoved); returns how many were dropped."""
        dropped: list[int] = []
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block[block.block_hash]
            dropped.append(block.block_hash)
            block.block_hash = None
            self.empty.append(block_id)
        if dropped:
            self.pending_events.append(BlockRemoved(tuple(dropped)))
        return len(dropped)

    def take_events(self) -> list[KvEvent]:
        """Pending events, the pool's (tier 0) then the lower tiers'; each tier's own order is kept."""
        events, self.pending_events = self.pending_events, []
        return events + self.tiers.take_events() if self.tiers is not None else events
