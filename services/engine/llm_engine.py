"""``Engine``: the synchronous inference engine a worker drives one ``step()`` at a time.

The scheduler decides, the runner computes, the block manager owns memory; the engine wires
them, validates requests, applies stop rules and publishes KV events.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.hashing import block_hashes
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.kv_events import AllCleared, BlockStored, KvEvent, KvEventCallback
from services.engine.kv_tiers import TIER_DISK, TIER_HOST, LowerTiers
from services.engine.kv_transfer import KvExport, KvReservation, read_blocks, write_blocks
from services.engine.loader import load_model, load_model_config
from services.engine.mock_runner import MockRunner
from services.engine.model_runner import create_runner
from services.engine.model_source import model_id as resolve_model_id
from services.engine.outputs import RequestOutput, TokenLogprob
from services.engine.sampler import sample
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence, SequenceStatus
from services.engine.timing_model import TimingProfile
from services.engine.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Longest a step with nothing to compute waits for a disk read; an AsyncEngine's queued
# calls (aborts, new requests) wait at most this long.
_LOAD_WAIT_S = 0.05


class NoFreeBlocksError(RuntimeError):
    """The KV pool cannot hold what was asked right now (maps to RESOURCE_EXHAUSTED)."""


@dataclass
class EngineStats:
    running: int
    waiting: int
    blocks_total: int
    blocks_used: int
    blocks_cached: int
    blocks_free: int
    prefix_hit_tokens: int
    preemptions: int
    # Lower tiers: blocks held now, and blocks promoted back into the pool instead of recomputed.
    host_blocks: int = 0
    disk_blocks: int = 0
    host_hit_blocks: int = 0
    disk_hit_blocks: int = 0


class Engine:
    def __init__(self, config: EngineConfig | None = None, kv_event_callback: KvEventCallback | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        dtype = _DTYPES[config.dtype]
        device = torch.device(config.device)
        self.model_id = resolve_model_id(config.model)
        self.tokenizer: Tokenizer | None = load_tokenizer(config.model)
        model = None if config.engine == "mock" else load_model(config.model, dtype, device, seed=config.seed)
        mcfg = self.model_config = model.cfg if model is not None else load_model_config(config.model)
        if config.max_model_len is not None and config.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context "
                             f"({mcfg.max_position_embeddings})")
        bytes_per_block = (mcfg.num_layers * 2 * config.block_size * mcfg.num_kv_heads * mcfg.head_dim
                           * torch.tensor([], dtype=dtype).element_size())
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // bytes_per_block)
        # A sequence can never need more than the whole pool, so it always completes eventually.
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings,
                                 num_blocks * config.block_size)
        self.vocab_size = mcfg.vocab_size
        self.eos_token_ids = set(mcfg.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else []))
        self.runner = (create_runner(model, num_blocks, config.block_size, self.max_model_len, config.max_num_seqs)
                       if model is not None
                       else MockRunner(mcfg, num_blocks, config.block_size, TimingProfile.load(config.mock_profile)))
        self.tiers = self._lower_tiers()
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, self.tiers)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Sequence] = {}
        # Sequences whose prompt KV is on its way from another worker (``reserve_kv``).
        self.reservations: dict[str, tuple[Sequence, KvReservation]] = {}
        self._arrivals = itertools.count()
        self._generate_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)
        self._event_seq = 0
        self._kv_event_callback = kv_event_callback
        self._publish([AllCleared()])
        self._flush_events()  # blocks an earlier run left in the disk tier

    def _lower_tiers(self) -> LowerTiers | None:
        """G2/G3 behind the pool, or None when both are off (or prefix caching is, or the engine
        is the mock, whose pool holds no real bytes)."""
        c = self.config
        if not (c.host_cache_bytes or c.disk_cache_bytes) or not c.enable_prefix_caching or c.engine == "mock":
            return None
        # One directory per model, dtype and block size: a block file is only ever read back
        # into a pool of exactly its shape and meaning.
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.model_id}-{c.dtype}-bs{c.block_size}")
        disk_dir = Path(c.disk_cache_dir) / name if c.disk_cache_bytes else None
        return LowerTiers(self.runner.kv_cache, c.host_cache_bytes, c.disk_cache_bytes, disk_dir)

    # --- requests ---------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: Seq[int], sampling: SamplingParams) -> list[int]:
        """Check a request without touching engine state (safe from any thread); returns the ids as ints."""
        if not isinstance(sampling, SamplingParams):
            raise ValueError("sampling must be a SamplingParams")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"unknown token id {bad[0]}: the vocabulary has {self.vocab_size} tokens")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context allows at most "
                             f"{self.max_model_len - 1} prompt tokens")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        return ids

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], sampling: SamplingParams,
                    *, keep_kv: bool = False, max_tokens_per_step: int = 0) -> None:
        """Queue a request. ``keep_kv`` holds its blocks after it finishes, for ``export_kv``;
        ``max_tokens_per_step`` (0 = no cap) prefills it in steps of at most that many tokens."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if request_id in self.requests or request_id in self.reservations:
            raise ValueError(f"duplicate request id {request_id!r}")
        ids = self.validate_request(prompt_token_ids, sampling)
        if max_tokens_per_step < 0:
            raise ValueError(f"max_tokens_per_step must be >= 0, got {max_tokens_per_step}")
        seq = self._new_sequence(request_id, ids, len(ids), sampling, keep_kv)
        seq.max_tokens_per_step = max_tokens_per_step
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, token_ids: list[int], num_prompt: int, sampling: SamplingParams,
                      keep_kv: bool) -> Sequence:
        seq = Sequence(request_id, token_ids, num_prompt, sampling, self.config.block_size,
                       next(self._arrivals), keep_kv=keep_kv)
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else int(
                torch.randint(0, 2**62, (1,), generator=self._rng))
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        if self.tokenizer is not None:
            seq.detokenizer = self.tokenizer.detokenizer(token_ids[:num_prompt])
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it was not known (already done)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        seq.keep_kv = False
        if seq.status is SequenceStatus.FINISHED:
            self.blocks.free(seq)
        else:
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        self._flush_events()
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling round and one forward pass; return the requests that advanced."""
        items = self.scheduler.schedule()
        if not items and self.scheduler.loading:
            # Only disk reads are left: wait for one (briefly, so queued calls still run soon).
            self.scheduler.wait_for_loads(_LOAD_WAIT_S)
        outputs: list[RequestOutput] = []
        if items:
            seqs, logits = self.runner.execute(items)
            for seq, n in items:
                seq.num_computed_tokens += n
                self.blocks.commit(seq)
            if seqs:
                tokens, logprobs = sample(logits, seqs)
                for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
                    outputs.append(self._append_token(seq, token, lp))
        self._flush_events()
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        sp = seq.sampling
        seq.token_ids.append(token)
        reason = None
        if (token in self.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            reason = "stop"
        elif seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        text = ""
        if seq.detokenizer is not None:
            seq.detokenizer.add([token])
            text, stopped = self._release_text(seq, final=reason is not None)
            if stopped:
                reason = "stop"
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
            if not seq.keep_kv:
                self.requests.pop(seq.request_id, None)
        queue_s = seq.admitted_at - seq.added_at if seq.num_output_tokens == 1 and seq.admitted_at else None
        return RequestOutput(seq.request_id, [token], text, reason, [logprob] if logprob else None,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_prompt_tokens, queue_s)

    def _release_text(self, seq: Sequence, final: bool) -> tuple[str, bool]:
        """Newly releasable text, holding back a tail that could still grow into a stop string."""
        detok = seq.detokenizer
        if final:
            detok.flush()
        text, sent = detok.text, seq.num_text_sent
        stops = seq.sampling.stop
        if stops:
            longest = max(len(s) for s in stops)
            window_start = max(0, sent - longest + 1)
            hits = [i for i in (text.find(s, window_start) for s in stops) if i >= 0]
            if hits:
                end = max(min(hits), sent)
                seq.num_text_sent = end
                return text[sent:end], True
            if not final:
                end = max(sent, len(text) - longest + 1)
                seq.num_text_sent = end
                return text[sent:end], False
        seq.num_text_sent = len(text)
        return text[sent:], False

    # --- KV export / import (disaggregated prefill) -----------------------------------------
    def export_kv(self, request_id: str, release: bool = True, first_block: int = 0,
                  full_blocks_only: bool = False) -> KvExport:
        """The computed KV of a request (running, or finished with ``keep_kv``) from block
        ``first_block`` on; ``full_blocks_only`` leaves out a trailing partial block (a running
        prefill's finished blocks, sent while the rest is computed). ``release`` then drops the
        request and frees its blocks (full ones stay cached)."""
        seq = self.requests.get(request_id)
        if seq is None:
            raise KeyError(f"unknown request {request_id!r} (finished without keep_kv?)")
        n, bs = seq.num_computed_tokens, self.config.block_size
        end = n // bs if full_blocks_only else -(-n // bs)
        used = seq.block_table[first_block:end]
        hashes = (seq.block_hashes + [0] * end)[first_block:end]
        export = KvExport(seq.token_ids[:n], n, hashes, read_blocks(self.runner.kv_cache, used), first_block)
        if release:
            self.abort(request_id)
        return export

    def held_prefix_blocks(self, token_ids: Seq[int]) -> int:
        """Leading full blocks of ``token_ids`` this worker holds in any tier (a peer fetch
        starts after them)."""
        return self.blocks.held_prefix_length(list(token_ids))

    def export_cached(self, block_hashes: Seq[int], first_block: int = 0) -> KvExport:
        """The leading blocks of a hash chain held here in any tier, from ``first_block`` until
        the first one missing, for a peer that would otherwise recompute them. The export has
        no token ids: the receiver checks the hashes against its own tokens."""
        parts: list[torch.Tensor] = []
        for h in list(block_hashes)[first_block:]:
            block_id = self.blocks.hash_to_block.get(h)
            data = (self.runner.kv_cache[:, :, block_id].cpu() if block_id is not None
                    else self.tiers.read(h) if self.tiers is not None else None)
            if data is None:
                break
            parts.append(data)
        bs = self.config.block_size
        data = torch.stack(parts, dim=2) if parts else self.runner.kv_cache[:, :, :0].cpu()
        end = first_block + len(parts)
        return KvExport([], end * bs, list(block_hashes)[first_block:end], data, first_block)

    def import_cached(self, token_ids: Seq[int], kv: KvExport) -> int:
        """Keep a peer's blocks ``kv.first_block..`` of ``token_ids`` as cached blocks here (the
        next request with that prefix reuses them); returns how many the pool took. Raises
        ValueError when the blocks do not name these tokens or do not fit this pool."""
        bs = self.config.block_size
        end = kv.first_block + kv.num_blocks
        chain = block_hashes(list(token_ids[: end * bs]), bs)
        if len(chain) < end or chain[kv.first_block : end] != list(kv.block_hashes):
            raise ValueError("the peer's blocks do not name this prompt's leading tokens")
        pool = self.runner.kv_cache
        if kv.num_blocks and (kv.data.dtype != pool.dtype or kv.data.shape[:2] != pool.shape[:2]
                              or kv.data.shape[3:] != pool.shape[3:]):
            raise ValueError(f"the peer's {kv.dtype} blocks {tuple(kv.data.shape)} do not fit this pool")
        parent = chain[kv.first_block - 1] if kv.first_block else None
        taken = self.blocks.add_cached(chain[kv.first_block : end], parent)
        fill = [(i, block_id) for i, block_id in enumerate(taken) if block_id is not None]
        if fill:
            index = torch.tensor([i for i, _ in fill], dtype=torch.long)
            write_blocks(self.runner.kv_cache, [block_id for _, block_id in fill], kv.data.index_select(2, index))
        self._flush_events()
        return len(taken)

    def cached_prefix_blocks(self, token_ids: Seq[int]) -> int:
        """Leading full blocks of ``token_ids`` already in this pool (read-only)."""
        return self.blocks.cached_prefix_length(list(token_ids))

    def add_request_with_kv(self, request_id: str, prompt_token_ids: Seq[int], sampling: SamplingParams,
                            kv: KvExport, output_token_ids: Seq[int] = (), kv_first_block: int = 0) -> None:
        """Continue a sequence prefilled elsewhere: its prompt, the tokens already generated there
        (``output_token_ids``, counted against ``max_tokens``), and the KV of its first
        ``kv.num_tokens`` tokens. ``kv`` may start at block ``kv_first_block`` when this pool
        already holds the blocks before it (they are reused, not sent). Raises NoFreeBlocksError
        when the pool cannot take it now, or when the blocks it was to reuse were evicted."""
        self._check_continuation(prompt_token_ids, sampling, output_token_ids)
        if not 0 < kv.num_tokens < len(prompt_token_ids) + len(output_token_ids) or kv.token_ids != (
                list(prompt_token_ids) + list(output_token_ids))[: kv.num_tokens]:
            raise ValueError("the KV does not cover a strict prefix of the request's tokens")
        bs = self.config.block_size
        if kv_first_block < 0 or kv_first_block + kv.num_blocks != -(-kv.num_tokens // bs):
            raise ValueError(f"{kv_first_block} + {kv.num_blocks} KV blocks cannot hold {kv.num_tokens} tokens of {bs}")
        if kv_first_block > (len(prompt_token_ids) - 1) // bs:
            raise ValueError(f"the {kv_first_block} blocks to reuse go past the prompt's last full block")
        reservation = self._reserve(request_id, prompt_token_ids, sampling, kv.num_tokens, kv_first_block > 0)
        try:
            if reservation.first_block < kv_first_block:
                raise NoFreeBlocksError(f"{kv_first_block - reservation.first_block} of the blocks to reuse "
                                        "were evicted meanwhile")  # fmt: skip
            # Blocks found here since the sender was asked are kept; only the rest is written.
            write_blocks(self.runner.kv_cache, reservation.block_ids,
                         kv.data[:, :, reservation.first_block - kv_first_block :])  # fmt: skip
            self.start_reserved(request_id, kv.num_tokens, output_token_ids)
        except BaseException:
            self.release_reservation(request_id)
            raise

    def reserve_kv(self, request_id: str, prompt_token_ids: Seq[int], sampling: SamplingParams) -> KvReservation:
        """Hold pool blocks for the KV of a prompt another worker is about to compute, so that
        its bytes go straight into place as they arrive (``KvReservation.write``). The leading
        blocks this worker holds in its pool or host memory are reused (the reservation starts
        after them; blocks only its disk holds are sent again rather than waited for); the rest
        stay unnamed until ``start_reserved``. Raises NoFreeBlocksError when the pool cannot
        hold the prompt now. The caller must end it with ``start_reserved`` or
        ``release_reservation``."""
        self._check_continuation(prompt_token_ids, sampling, ())
        return self._reserve(request_id, prompt_token_ids, sampling, len(prompt_token_ids), True)

    def _check_continuation(self, prompt_token_ids: Seq[int], sampling: SamplingParams,
                            output_token_ids: Seq[int]) -> None:  # fmt: skip
        ids = self.validate_request(prompt_token_ids, sampling)
        outputs = list(output_token_ids)
        if any(not 0 <= t < self.vocab_size for t in outputs):
            raise ValueError("unknown token id in output_token_ids")
        if len(outputs) >= sampling.max_tokens or len(ids) + len(outputs) >= self.max_model_len:
            raise ValueError("the request has no tokens left to generate")

    def _reserve(self, request_id: str, prompt_token_ids: Seq[int], sampling: SamplingParams, num_tokens: int,
                 reuse: bool) -> KvReservation:  # fmt: skip
        if request_id in self.requests or request_id in self.reservations:
            raise ValueError(f"duplicate request id {request_id!r}")
        ids = list(prompt_token_ids)
        seq = self._new_sequence(request_id, ids, len(ids), sampling, keep_kv=False)
        seq.admitted = True  # its prompt was computed elsewhere: no local prefix hit to count
        if reuse:
            # Not from disk: waiting for those reads here would stall every sequence this engine
            # steps (the sender sends those blocks instead); pool and host-memory blocks are in
            # place at once.
            self.blocks.match_prefix(seq, from_disk=False)
        reused = len(seq.block_table)
        bs = self.config.block_size
        if not self.blocks.allocate(seq, num_tokens - reused * bs):
            short = NoFreeBlocksError(f"the pool has {self.blocks.num_free} free blocks; "
                                      f"{-(-num_tokens // bs) - reused} are needed")  # fmt: skip
            self.blocks.free(seq)
            self._flush_events()
            raise short
        seq.num_computed_tokens = reused * bs
        reservation = KvReservation(reused, seq.block_table[reused:], num_tokens, self.runner.kv_cache)
        self.reservations[request_id] = (seq, reservation)
        self._flush_events()
        return reservation

    def start_reserved(self, request_id: str, num_tokens: int, output_token_ids: Seq[int] = ()) -> None:
        """Start decoding a reserved sequence whose blocks now hold the KV of its first
        ``num_tokens`` tokens (the prompt), after the tokens generated elsewhere
        (``output_token_ids``); its blocks are named now, not before."""
        if request_id not in self.reservations:
            raise ValueError(f"no blocks are reserved for {request_id!r}")
        seq, reservation = self.reservations[request_id]
        outputs = list(output_token_ids)
        self._check_continuation(seq.token_ids, seq.sampling, outputs)
        if num_tokens != reservation.num_tokens:
            raise ValueError(f"the KV covers {num_tokens} tokens; {reservation.num_tokens} were reserved")
        if num_tokens >= len(seq.token_ids) + len(outputs):
            raise ValueError("the KV covers every token: the last one, generated elsewhere, must come with it")
        del self.reservations[request_id]
        seq.token_ids += outputs
        if seq.detokenizer is not None and outputs:
            seq.detokenizer.add(outputs)
            seq.num_text_sent = len(seq.detokenizer.text)
        seq.num_computed_tokens = num_tokens
        self.blocks.commit(seq)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self._flush_events()

    def release_reservation(self, request_id: str) -> bool:
        """Free a reservation's blocks (its transfer failed); False if there was none."""
        held = self.reservations.pop(request_id, None)
        if held is None:
            return False
        self.blocks.free(held[0])
        self._flush_events()
        return True

    # --- KV events --------------------------------------------------------------------------
    def set_kv_event_callback(self, callback: KvEventCallback | None) -> None:
        self._kv_event_callback = callback

    def _publish(self, events: list[KvEvent]) -> None:
        self._event_seq += 1
        if self._kv_event_callback is not None:
            self._kv_event_callback(self._event_seq, events)

    def _flush_events(self) -> None:
        events = self.blocks.take_events()
        if events:
            self._publish(events)

    def cached_block_hashes(self) -> list[int]:
        """Every block hash the pool holds now (running or evictable), for a full resync."""
        return self.blocks.cached_block_hashes()

    def resync_events(self) -> list[KvEvent]:
        """A full snapshot: ``AllCleared`` then one ``BlockStored`` per tier of every hash it holds
        (not one chain: its ``parent_hash`` is None and the order carries no meaning)."""
        held = {0: self.cached_block_hashes(), **self.blocks.lower_tier_hashes()}
        return [AllCleared()] + [BlockStored(tuple(hashes), None, tier) for tier, hashes in held.items() if hashes]

    def reset_prefix_cache(self) -> int:
        """Drop every evictable cached block (emits BlockRemoved); returns how many."""
        n = self.blocks.clear_cache()
        self._flush_events()
        return n

    # --- introspection and convenience ------------------------------------------------------
    def stats(self) -> EngineStats:
        b, t = self.blocks, self.tiers
        # A sequence loading its prefix from disk counts as waiting: it has not run yet.
        waiting = len(self.scheduler.waiting) + len(self.scheduler.loading)
        stats = EngineStats(running=len(self.scheduler.running), waiting=waiting,
                            blocks_total=b.num_blocks, blocks_used=b.num_used, blocks_cached=b.num_cached,
                            blocks_free=b.num_free - b.num_cached, prefix_hit_tokens=b.prefix_hit_tokens,
                            preemptions=self.scheduler.num_preemptions)
        if t is not None:
            stats.host_blocks = len(t.host) if t.host is not None else 0
            stats.disk_blocks = len(t.disk) if t.disk is not None else 0
            stats.host_hit_blocks, stats.disk_hit_blocks = t.hit_blocks[TIER_HOST], t.hit_blocks[TIER_DISK]
        return stats

    def close(self) -> None:
        """Finish the disk tier's queued writes (a restarted worker finds every demoted block)."""
        if self.tiers is not None:
            self.tiers.close()

    def generate(self, prompts: Seq[Seq[int] | str], sampling: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Offline batch generation: one aggregated ``RequestOutput`` per prompt, in order.

        String prompts are tokenized as plain text (no chat template)."""
        sampling = sampling or SamplingParams()
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        ids = []
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            rid = f"generate-{next(self._generate_ids)}-{i}"
            self.add_request(rid, tokens, sp)
            ids.append(rid)
        results = {rid: RequestOutput(rid, []) for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                acc = results.get(out.request_id)
                if acc is None:
                    continue
                acc.new_token_ids += out.new_token_ids
                acc.text += out.text
                if out.logprobs:
                    acc.logprobs = (acc.logprobs or []) + out.logprobs
                acc.finish_reason = out.finish_reason
                acc.num_prompt_tokens, acc.num_output_tokens = out.num_prompt_tokens, out.num_output_tokens
                acc.num_cached_tokens = out.num_cached_tokens
        return [results[rid] for rid in ids]
