"""StepGraphs: CUDA graphs of whole model steps, for pure decodes and for small prefill / mixed steps.

A small eager step is launch-bound: a few hundred tokens cost ≈ 18 ms on an H100 but ≈ 50 ms of
host time issuing ≈ 2,000 launches. So each padded step shape gets one captured graph of the whole
forward, in two families:
- `DecodeGraphs`: b sequences of one token each (every sample row reads its own sequence), padded
  to the next captured batch size g >= b.
- `PrefillGraphs`: any other step of at most `max_tokens` tokens, `MAX_SEQS` sequences and
  `MAX_SEQS` logits rows, without state captures. The tokens are padded to the next captured size
  by one padding sequence (no initial state, fresh from zeros); the sequences are padded to
  MAX_SEQS by empty ones, which the varlen ops skip (an empty sequence leaves its slot alone).
Padding rows point at the runner's spare state slot and KV block, so they never touch a live
sequence; a padding sequence's tokens write the spare block's entries its attention reads.

All graphs share one memory pool (captured largest first, decode then prefill) and write their
logits into one shared buffer, so a graph's output costs no memory of its own. A step's inputs
come packed by the runner's InputPacker, like every step, and are copied into the family's static
buffers before the replay. Used only on CUDA without `enforce_eager`; the sampler runs after the
replay, outside the graph.
"""

from __future__ import annotations

import logging
import time

import torch

from hybridserve.engine.step_plan import StepPlan
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

MAX_SEQS = 32  # sequences (and logits rows) of a graphed prefill step; below every token size


def capture_sizes(max_batch: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, every 16 up to 256, every 32 up to 512, then every
    64; max_batch itself is always included. Fine steps where padding costs most, coarse ones above
    256, where 64 padded rows are < 25 % of a step: 35 graphs up to 1024 (start-up stays short)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32), *range(576, max_batch + 1, 64)]
    return [s for s in sizes if s < max_batch] + [max_batch]


def prefill_sizes(max_tokens: int) -> list[int]:
    """Token sizes of the prefill graphs: every 64 up to 512, every 128 up to 1024, then every 256
    (past 512 tokens at most 1/5 of a step is padding); max_tokens itself is always included. None
    below 64 tokens (a graph needs more tokens than sequences)."""
    if max_tokens < 64:
        return []
    sizes = [*range(64, 513, 64), *range(640, 1025, 128), *range(1280, max_tokens + 1, 256)]
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class _Family:
    """Graphs of one step shape family over shared static inputs; `_batch(g)` is the batch graph g
    runs (views of them), `_fill(batch, g)` copies a packed step into them and pads it to g."""

    sizes: list[int]

    def __init__(self) -> None:
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def size_for(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def capture(self, model, cache: HybridCache, logits: torch.Tensor, pool, stream):
        """Capture every size, largest first, in `pool`; returns the pool."""
        for g in reversed(self.sizes):
            batch = self._padding(g)
            out = logits[: batch.logits_indices.shape[0]]
            model(batch, cache, out)  # warm-up: Triton compiles/autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                model(batch, cache, out)
            pool = graph.pool()
            self.graphs[g] = graph
        return pool

    def _padding(self, g: int) -> ForwardBatch:
        """Graph g's batch with padding rows only (what the capture runs)."""
        return self._batch(g)

    def replay(self, batch: ForwardBatch, n: int) -> None:
        g = self.size_for(n)
        self._fill(batch, g)
        self.graphs[g].replay()


class DecodeGraphs(_Family):
    """Pure decodes of up to `max_batch` sequences."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, pad_slot: int, pad_block: int,
                 device) -> None:
        super().__init__()
        self.sizes = capture_sizes(max_batch)
        self.pad_slot, self.pad_slot_mapping, self.pad_block = pad_slot, pad_block * block_size, pad_block
        n = self.sizes[-1]
        # static inputs; every row starts out as padding
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.state_slots = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.has_initial_state = torch.ones(n, dtype=torch.bool, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), self.pad_slot_mapping, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def fits(self, plan: StepPlan) -> bool:
        """A pure decode of continuing sequences, one sample each, within the captured sizes."""
        return plan.num_seqs <= self.max_batch and plan.is_decode and plan.samples_each_sequence_once

    def _fill(self, batch: ForwardBatch, g: int) -> None:
        b = batch.input_ids.shape[0]
        width = batch.block_tables.shape[1]
        self.input_ids[:b].copy_(batch.input_ids)
        self.seq_lens[:b].copy_(batch.seq_lens)
        self.state_slots[:b].copy_(batch.state_slots)
        self.slot_mapping[:b].copy_(batch.slot_mapping)
        self.block_tables[:b, :width].copy_(batch.block_tables)
        if g > b:  # rows left over from a bigger batch become padding again
            self.input_ids[b:g] = 0
            self.seq_lens[b:g] = 1
            self.state_slots[b:g] = self.pad_slot
            self.slot_mapping[b:g] = self.pad_slot_mapping
            self.block_tables[b:g, 0] = self.pad_block

    def _batch(self, g: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:g], cu_seqlens=self.cu_seqlens[: g + 1], seq_lens=self.seq_lens[:g],
            state_slots=self.state_slots[:g], has_initial_state=self.has_initial_state[:g],
            block_tables=self.block_tables[:g], slot_mapping=self.slot_mapping[:g],
            logits_indices=self.logits_indices[:g], is_decode=True,
        )


class PrefillGraphs(_Family):
    """Prefill and mixed steps of up to `max_tokens` tokens and MAX_SEQS sequences (see the module
    docstring). `padded(batch)` is the batch the graph runs, usable eagerly too (the CPU tests)."""

    def __init__(self, max_tokens: int, max_blocks_per_seq: int, block_size: int, pad_slot: int, pad_block: int,
                 device) -> None:
        super().__init__()
        self.sizes = prefill_sizes(max_tokens)
        assert self.sizes and self.sizes[0] > MAX_SEQS, "a step of as many tokens as sequences reads as a decode"
        t, s = self.sizes[-1], MAX_SEQS + 1  # room for the padding sequence after MAX_SEQS real ones
        self.pad_slot, self.pad_block = pad_slot, pad_block
        # padding token i writes (and its attention reads) entry i % block_size of the spare block
        self.pad_slot_mapping = pad_block * block_size + torch.arange(t, device=device) % block_size
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = self.pad_slot_mapping.clone()
        self.cu_seqlens = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.state_slots = torch.full((s,), pad_slot, dtype=torch.int64, device=device)
        self.has_initial_state = torch.zeros(s, dtype=torch.bool, device=device)
        # wide enough for the padding sequence, which may be longer than max_model_len
        width = max(max_blocks_per_seq, -(-t // block_size))
        self.block_tables = torch.full((s, width), pad_block, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(MAX_SEQS, dtype=torch.int64, device=device)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def fits(self, plan: StepPlan) -> bool:
        return (plan.num_tokens <= self.max_tokens and plan.num_seqs <= MAX_SEQS
                and plan.num_logits_rows <= MAX_SEQS and not len(plan.captures))

    def padded(self, batch: ForwardBatch) -> ForwardBatch:
        """The step padded to its captured size, in the static inputs."""
        g = self.size_for(batch.input_ids.shape[0])
        self._fill(batch, g)
        return self._batch(g)

    def _padding(self, g: int) -> ForwardBatch:
        self._fill(None, g)
        return self._batch(g)

    def _fill(self, batch: ForwardBatch | None, g: int) -> None:
        """The step's rows, then padding up to g tokens (None: padding only)."""
        t = b = r = 0
        if batch is not None:
            t, b, r = batch.input_ids.shape[0], batch.seq_lens.shape[0], batch.logits_indices.shape[0]
            self.input_ids[:t].copy_(batch.input_ids)
            self.slot_mapping[:t].copy_(batch.slot_mapping)
            self.cu_seqlens[: b + 1].copy_(batch.cu_seqlens)
            self.seq_lens[:b].copy_(batch.seq_lens)
            self.state_slots[:b].copy_(batch.state_slots)
            self.has_initial_state[:b].copy_(batch.has_initial_state)
            self.block_tables[:b, : batch.block_tables.shape[1]].copy_(batch.block_tables)  # later columns: unread
            self.logits_indices[:r].copy_(batch.logits_indices)
        self.input_ids[t:g] = 0
        self.slot_mapping[t:g].copy_(self.pad_slot_mapping[: g - t])
        self.cu_seqlens[b + 1 :] = g  # sequence b: the padding tokens t..g-1; the ones after it empty
        self.seq_lens[b:] = 0
        self.seq_lens[b] = g - t
        self.state_slots[b:] = self.pad_slot
        self.has_initial_state[b:] = False
        self.block_tables[b:] = self.pad_block
        self.logits_indices[r:] = 0

    def _batch(self, g: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:g], cu_seqlens=self.cu_seqlens, seq_lens=self.seq_lens,
            state_slots=self.state_slots, has_initial_state=self.has_initial_state, block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:g], logits_indices=self.logits_indices,
        )


class StepGraphs:
    """Both families over one pool and one logits buffer; `run(plan, batch)` replays the graph that
    fits the step and returns its logits [R, V] (a view of the shared buffer), or None (run eager)."""

    def __init__(self, model: torch.nn.Module, cache: HybridCache, *, max_decode_batch: int, max_prefill_tokens: int,
                 max_blocks_per_seq: int, pad_slot: int, pad_block: int) -> None:
        self.model, self.cache = model, cache
        device, bs = cache.kv.device, cache.block_size
        self.decode = DecodeGraphs(max_decode_batch, max_blocks_per_seq, bs, pad_slot, pad_block, device)
        self.prefill = (PrefillGraphs(max_prefill_tokens, max_blocks_per_seq, bs, pad_slot, pad_block, device)
                        if prefill_sizes(max_prefill_tokens) else None)
        rows = max(self.decode.max_batch, MAX_SEQS if self.prefill else 0)
        self.logits = torch.empty(rows, model.config.vocab_size, dtype=torch.float32, device=device)
        self._capture()

    def run(self, plan: StepPlan, batch: ForwardBatch) -> torch.Tensor | None:
        if self.decode.fits(plan):
            self.decode.replay(batch, plan.num_seqs)
        elif self.prefill is not None and self.prefill.fits(plan):
            self.prefill.replay(batch, plan.num_tokens)
        else:
            return None
        return self.logits[: plan.num_logits_rows]

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        pool = None
        with torch.cuda.stream(stream):
            for family in (self.decode, self.prefill):
                if family is not None:
                    pool = family.capture(self.model, self.cache, self.logits, pool, stream)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        prefill = f", prefill/mixed steps up to {self.prefill.max_tokens} tokens and {MAX_SEQS} sequences " \
                  f"({len(self.prefill.sizes)})" if self.prefill else ""
        logger.info("captured CUDA graphs: decode batch 1..%d (%d)%s in %.1f s", self.decode.max_batch,
                    len(self.decode.sizes), prefill, time.perf_counter() - start)
