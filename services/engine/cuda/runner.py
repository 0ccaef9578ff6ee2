"""The model runner on a CUDA GPU: Triton paged attention, and decode steps replayed from CUDA graphs.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python
the GPU idles between them. So at start-up the decode forward pass (all layers and the LM
head) is captured once per batch size in ``GRAPH_BATCH_SIZES``; a step pads its batch to the
next captured size (padded rows read no context and write K/V into a scratch block) and
replays it. Likewise a step that only prefills one prompt of up to 1,024 tokens from its
start (a cold time-to-first-token). Other steps (several prefills, cached prefixes, decode
mixed with prefill, larger batches) run eagerly with the same kernels.
Nothing in a step waits for the GPU except the sampler reading the chosen tokens.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from services.engine.attention import PrefillChunk
from services.engine.cuda.fused_ops import TritonOps
from services.engine.cuda.paged_attention import CudaAttentionMetadata
from services.engine.model_runner import ModelRunner
from services.engine.models.llama import LlamaForCausalLM
from services.engine.scheduler import ScheduledItem
from services.engine.sequence import Sequence

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# A step that only prefills one prompt from its start replays a graph padded to one of these
# token counts; past them the launches are a small part of the step, so it runs eagerly.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 1024)


class CudaModelRunner(ModelRunner):
    scratch_blocks = 1

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int) -> None:
        # Triton launches and graph captures go to the current device: make it this engine's.
        torch.cuda.set_device(model.embed_tokens.weight.device)
        super().__init__(model, num_blocks, block_size, max_model_len)
        model.ops = TritonOps
        self._scratch_slot = num_blocks * block_size
        cover = bisect.bisect_left(GRAPH_BATCH_SIZES, max_num_seqs)
        self.graph_sizes = GRAPH_BATCH_SIZES[: cover + 1]
        self.prefill_graph_tokens = tuple(n for n in PREFILL_GRAPH_TOKENS if n < max_model_len)
        largest = self.graph_sizes[-1]
        tokens = max(largest, *self.prefill_graph_tokens)
        dev = self.device
        # Static inputs every captured graph reads (each size a leading slice of them).
        self._ids = torch.zeros(tokens, dtype=torch.long, device=dev)
        self._positions = torch.zeros(tokens, dtype=torch.long, device=dev)
        self._slot_mapping = torch.full((tokens,), self._scratch_slot, dtype=torch.long, device=dev)
        self._tables = torch.zeros(largest, -(-max_model_len // block_size), dtype=torch.int32, device=dev)
        self._lens = torch.ones(largest, dtype=torch.int32, device=dev)
        self._last_row = torch.zeros(1, dtype=torch.long, device=dev)
        # ("decode", batch) or ("prefill", tokens) -> (graph, its logits output).
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def _decode_forward(self, batch: int) -> torch.Tensor:
        meta = CudaAttentionMetadata(self._slot_mapping[:batch], batch, self._tables[:batch], self._lens[:batch])
        hidden = self.model(self._ids[:batch], self._positions[:batch], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    def _prefill_forward(self, tokens: int) -> torch.Tensor:
        """A prompt's first ``tokens`` (padding at the end: causal attention keeps it out of the
        real tokens' view, and its K/V land in the scratch block); logits of ``_last_row``."""
        meta = CudaAttentionMetadata(self._slot_mapping[:tokens], prefills=[PrefillChunk(0, tokens, tokens, None)])
        hidden = self.model(self._ids[:tokens], self._positions[:tokens], self.kv_cache, meta)
        return self.model.compute_logits(hidden.index_select(0, self._last_row))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so the smaller graphs fit in the memory the largest already reserved.
        shapes = [("prefill", n) for n in reversed(self.prefill_graph_tokens)]
        shapes += [("decode", b) for b in reversed(self.graph_sizes)]
        for shape in shapes:
            forward = self._decode_forward if shape[0] == "decode" else self._prefill_forward
            forward(shape[1])  # compiles the kernels, sizes cuBLAS workspaces
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = forward(shape[1])
            self._graphs[shape] = (graph, logits)
        torch.cuda.synchronize()

    def _decode_metadata(self, decode: list[Sequence]) -> tuple[torch.Tensor, CudaAttentionMetadata]:
        """The eager path's decode metadata: block tables and context lengths (int32, on the GPU)."""
        if not decode:
            return torch.empty(0, dtype=torch.long), CudaAttentionMetadata(slot_mapping=torch.empty(0))
        slots = torch.from_numpy(self._decode_slots(decode))
        tables, lens = self._tables_and_lens(decode, len(decode))
        meta = CudaAttentionMetadata(slots, len(decode), tables.to(self.device), lens.to(self.device))
        return slots, meta

    def _decode_slots(self, decode: list[Sequence]) -> np.ndarray:
        bs = self.block_size
        return np.array([s.block_table[s.num_computed_tokens // bs] * bs + s.num_computed_tokens % bs
                         for s in decode], dtype=np.int64)

    @staticmethod
    def _tables_and_lens(decode: list[Sequence], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [rows, widest] int32 and context lengths [rows] int32 (0 on padded rows)."""
        width = max((len(s.block_table) for s in decode), default=1)
        tables = np.zeros((rows, width), dtype=np.int32)
        lens = np.zeros(rows, dtype=np.int32)
        for row, s in enumerate(decode):
            tables[row, : len(s.block_table)] = s.block_table
            lens[row] = s.num_computed_tokens + 1
        return torch.from_numpy(tables), torch.from_numpy(lens)

    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> tuple[list[Sequence], torch.Tensor | None]:
        """As ``ModelRunner.execute``; a decode-only step, or one prompt's prefill from its start,
        replays a graph. Its logits live in the graph's output buffer: valid until the next
        ``execute``."""
        n = len(items)
        if (n == 1 and self.prefill_graph_tokens and items[0][0].num_computed_tokens == 0
                and 1 < items[0][1] <= self.prefill_graph_tokens[-1]):
            return self._replay_prefill(*items[0])
        if n > self.graph_sizes[-1] or any(k != 1 for _, k in items):
            return super().execute(items)
        batch = self.graph_sizes[bisect.bisect_left(self.graph_sizes, n)]
        decode = [s for s, _ in items]
        positions = np.zeros(batch, dtype=np.int64)
        positions[:n] = [s.num_computed_tokens for s in decode]
        ids = np.zeros(batch, dtype=np.int64)
        ids[:n] = [s.token_ids[p] for s, p in zip(decode, positions[:n].tolist(), strict=True)]
        slots = np.full(batch, self._scratch_slot, dtype=np.int64)
        slots[:n] = self._decode_slots(decode)
        tables, lens = self._tables_and_lens(decode, batch)
        self._ids[:batch].copy_(torch.from_numpy(ids), non_blocking=True)
        self._positions[:batch].copy_(torch.from_numpy(positions), non_blocking=True)
        self._slot_mapping[:batch].copy_(torch.from_numpy(slots), non_blocking=True)
        self._tables[:batch, : tables.shape[1]].copy_(tables, non_blocking=True)
        self._lens[:batch].copy_(lens, non_blocking=True)
        graph, logits = self._graphs["decode", batch]
        graph.replay()
        rows = [row for row, s in enumerate(decode) if s.num_computed_tokens + 1 == s.num_tokens]
        seqs = [decode[row] for row in rows]
        if len(rows) == n:
            return seqs, logits[:n]
        return seqs, logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.device))

    def _replay_prefill(self, seq: Sequence, n: int) -> tuple[list[Sequence], torch.Tensor | None]:
        size = self.prefill_graph_tokens[bisect.bisect_left(self.prefill_graph_tokens, n)]
        ids = np.zeros(size, dtype=np.int64)
        ids[:n] = seq.token_ids[:n]
        positions = np.zeros(size, dtype=np.int64)
        positions[:n] = np.arange(n)
        slots = np.full(size, self._scratch_slot, dtype=np.int64)
        slots[:n] = self._slots(seq.block_table, 0, n).numpy()
        self._ids[:size].copy_(torch.from_numpy(ids), non_blocking=True)
        self._positions[:size].copy_(torch.from_numpy(positions), non_blocking=True)
        self._slot_mapping[:size].copy_(torch.from_numpy(slots), non_blocking=True)
        self._last_row.fill_(n - 1)
        graph, logits = self._graphs["prefill", size]
        graph.replay()
        return ([seq], logits) if n == seq.num_tokens else ([], None)
