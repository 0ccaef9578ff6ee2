"""Continuous batching: every step, pick which sequences run and how many tokens each computes.

Running sequences go first (decode is 1 token; an unfinished prefill continues in chunks),
then waiting ones are admitted in arrival order while the token budget, the sequence limit
and the pool allow. When the pool runs dry, the most recently admitted sequence is preempted:
its blocks are freed (full ones stay cached, so its recompute mostly hits the prefix cache)
and it goes back to the front of the queue.

A waiting sequence whose prefix continues on disk is *loading* while those blocks are read in
the background: it leaves the queue (the ones behind it may be admitted), the running ones
keep stepping, and it is admitted from the front of the queue once its blocks are in.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait

from services.engine.block_manager import BlockManager, Promotion
from services.engine.sequence import Sequence, SequenceStatus

ScheduledItem = tuple[Sequence, int]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Sequences whose prefix blocks are being read from disk, by request id.
        self.loading: dict[str, tuple[Sequence, Promotion]] = {}
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until a loading sequence's blocks are in or ``timeout_s`` passes (an engine with
        nothing else to run waits here instead of spinning)."""
        wait([promotion.loaded for _, promotion in self.loading.values()], timeout_s, FIRST_COMPLETED)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort). A loading
        sequence's reads finish unused: its blocks are unnamed, so freeing them is enough."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif self.loading.pop(seq.request_id, None) is not None:
            seq.status = SequenceStatus.WAITING
        if not seq.keep_kv:
            self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _requeue_loaded(self) -> None:
        """Loading sequences whose blocks are in go back to the front of the queue, in arrival
        order. Their blocks, named now, are let go like any cached prefix: the admission that
        follows matches them again (they are the most recently freed, so the last evicted), and
        a sequence the pool cannot take yet waits holding nothing, as a fresh one does."""
        done = sorted((seq for seq, promotion in self.loading.values() if promotion.done),
                      key=lambda seq: seq.arrival, reverse=True)
        for seq in done:
            _, promotion = self.loading.pop(seq.request_id)
            self.blocks.finish_promotion(seq, promotion)
            self.blocks.free(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledItem]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledItem] = []
        queue = list(self.running)
        kept: list[Sequence] = []
        preempted = False
        while queue:
            seq = queue.pop(0)
            n = _tokens_to_compute(seq, budget)
            if n <= 0:
                kept.append(seq)
                continue
            while not self.blocks.allocate(seq, n):
                preempted = True
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is not None:
                scheduled.append((seq, n))
                kept.append(seq)
                budget -= n
        self.running = kept
        self._requeue_loaded()
        # After a preemption the pool is tight: admitting more would only thrash.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            holds_blocks = bool(seq.block_table)  # imported KV: its blocks are already in place
            if not holds_blocks:
                promotion = self.blocks.match_prefix(seq)
                if promotion is not None:
                    self.waiting.popleft()
                    seq.status = SequenceStatus.LOADING
                    self.loading[seq.request_id] = (seq, promotion)
                    continue
            n = _tokens_to_compute(seq, budget)
            if not self.blocks.allocate(seq, n):
                if not holds_blocks:
                    self.blocks.free(seq)
                break
            self.waiting.popleft()
            if not seq.admitted:
                seq.admitted = True
                seq.admitted_at = time.monotonic()
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
                self.blocks.prefix_hit_tokens += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled


def _tokens_to_compute(seq: Sequence, budget: int) -> int:
    """This step's share of ``seq``: what it has left, within the budget and its own step cap."""
    n = min(seq.num_tokens - seq.num_computed_tokens, budget)
    return min(n, seq.max_tokens_per_step) if seq.max_tokens_per_step else n
