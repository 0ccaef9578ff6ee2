"""The paged KV pool's bookkeeping: which block holds what, who uses it, what may be evicted.

Blocks are refcounted. A full, computed block is named by its chained hash and stays in
``hash_to_block`` after its last user leaves (cached, evictable, least-recently-freed first),
so a later request with the same prefix reuses it without recomputing. Only the pool's
owner (the engine) touches the tensors; this class only moves integers.

With lower tiers (``kv_tiers.LowerTiers``), a named block is demoted there when its pool
slot is reused, and a prefix match that runs out of pool blocks continues through them,
promoting each block it finds back into the pool (the tiers copy the bytes).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from kvmesh.hashing import block_hash
from services.engine.kv_events import BlockRemoved, BlockStored, KvEvent
from services.engine.kv_tiers import LowerTiers
from services.engine.sequence import Sequence


class Block:
    __slots__ = ("block_hash", "block_id", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None


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

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> None:
        """Attach the longest run of cached leading blocks to a sequence that holds none.

        At least one token is always left to compute: its logits give the next token.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
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
        else:
            h = None
        if h is not None and self.tiers is not None:
            self._promote_chain(seq, hashes, h, max_blocks)
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hashes) * bs

    def _promote_chain(self, seq: Sequence, hashes: list[int], h: int, max_blocks: int) -> None:
        """Continue a match at ``h``, the first hash the pool lacks, through the lower tiers: each
        block found there is copied into a pool block and named, until the chain breaks, a copy
        fails its check or the pool has no free block."""
        bs = self.block_size
        while self.tiers.tier_of(h) is not None and self.num_free:
            parent = hashes[-1] if hashes else None
            block_id = self._take()
            if not self.tiers.promote(h, block_id):
                self.blocks[block_id].ref_count = 0
                self.empty.append(block_id)
                return
            self.blocks[block_id].block_hash = h
            self.hash_to_block[h] = block_id
            self.pending_events.append(BlockStored((h,), parent))
            seq.block_table.append(block_id)
            hashes.append(h)
            i = len(hashes)
            if i >= max_blocks:
                return
            h = block_hash(seq.token_ids[i * bs : (i + 1) * bs], h)

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
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.empty.append(block_id)
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
