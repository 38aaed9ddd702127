"""StepGraphs: CUDA graphs of whole model steps, for pure decodes and for small prefill / mixed steps.

A small eager step is launch-bound: a few hundred tokens cost ≈ 18 ms on an H100 but ≈ 50 ms of
host time issuing ≈ 2,000 launches. So each padded step shape gets one captured graph of the whole
forward, in two families:
- `DecodeGraphs`: b sequences of one token each (every sample row reads its own sequence), padded
  to the next captured batch size g >= b.
- `PrefillGraphs`: any other step without state captures, in families by sequence count
  (`prefill_families`): up to `MAX_SEQS` sequences at every token size of `prefill_sizes`, and, for
  the mixed steps of a big decode batch (hundreds of decodes beside one prompt chunk: at high
  concurrency nearly every step), 128, 256, 512, ... sequences at token sizes just above that. The
  tokens are padded to the next captured size by one padding sequence (no initial state, fresh from
  zeros); the sequences are padded to the family's count by empty ones, which the varlen ops skip
  (an empty sequence leaves its slot alone). A step takes the narrowest family that fits it.
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

MAX_SEQS = 32  # sequences (and logits rows) of the narrow prefill graphs; below every token size
WIDE_SEQS = 128  # the narrowest of the wide families (then doubling up to the largest decode batch)
WIDE_TOKEN_STEP = 256  # token sizes of the wide families


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


def prefill_families(max_tokens: int, max_decode_batch: int, prefill_while_decoding: int) -> list[tuple[int, list[int]]]:
    """(sequences, token sizes) of each prefill-graph family, narrowest first, no size above
    max_tokens: MAX_SEQS sequences at `prefill_sizes(max_tokens)`; then WIDE_SEQS, twice that, ...
    and max_decode_batch itself (no step has more sequences than the largest decode batch) at every
    WIDE_TOKEN_STEP tokens above the sequence count, up to the count plus `prefill_while_decoding`
    (the scheduler's prompt-token cap while sequences decode)."""
    narrow = prefill_sizes(max_tokens)
    families = [(MAX_SEQS, narrow)] if narrow else []
    counts = [c for c in (WIDE_SEQS << i for i in range(32)) if c < max_decode_batch]
    for seqs in [*counts, max_decode_batch] if max_decode_batch > MAX_SEQS else []:
        top = min(max_tokens, seqs + prefill_while_decoding)
        sizes = [*range((seqs // WIDE_TOKEN_STEP + 1) * WIDE_TOKEN_STEP, top, WIDE_TOKEN_STEP), top]
        if top > seqs:
            families.append((seqs, sizes))
    return families


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
    """Prefill and mixed steps of up to `max_seqs` sequences (and logits rows) at the token `sizes`
    (see the module docstring). `padded(batch)` is the batch the graph runs, usable eagerly too (the
    CPU tests)."""

    def __init__(self, sizes: list[int], max_seqs: int, max_blocks_per_seq: int, block_size: int, pad_slot: int,
                 pad_block: int, device) -> None:
        super().__init__()
        self.sizes, self.max_seqs = sizes, max_seqs
        assert sizes and sizes[0] > max_seqs, "a step of as many tokens as sequences reads as a decode"
        t, s = sizes[-1], max_seqs + 1  # room for the padding sequence after max_seqs real ones
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
        self.logits_indices = torch.zeros(max_seqs, dtype=torch.int64, device=device)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def fits(self, plan: StepPlan) -> bool:
        return (plan.num_tokens <= self.max_tokens and plan.num_seqs <= self.max_seqs
                and plan.num_logits_rows <= self.max_seqs and not len(plan.captures))

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
    """All families over one pool and one logits buffer; `run(plan, batch)` replays the graph that
    fits the step and returns its logits [R, V] (a view of the shared buffer), or None (run eager)."""

    def __init__(self, model: torch.nn.Module, cache: HybridCache, *, max_decode_batch: int, max_prefill_tokens: int,
                 prefill_while_decoding: int, max_blocks_per_seq: int, pad_slot: int, pad_block: int) -> None:
        self.model, self.cache = model, cache
        device, bs = cache.kv.device, cache.block_size
        self.decode = DecodeGraphs(max_decode_batch, max_blocks_per_seq, bs, pad_slot, pad_block, device)
        self.prefill = [PrefillGraphs(sizes, seqs, max_blocks_per_seq, bs, pad_slot, pad_block, device)
                        for seqs, sizes in prefill_families(max_prefill_tokens, max_decode_batch, prefill_while_decoding)]
        rows = max([self.decode.max_batch] + [f.max_seqs for f in self.prefill])
        self.logits = torch.empty(rows, model.config.vocab_size, dtype=torch.float32, device=device)
        self._capture()

    def run(self, plan: StepPlan, batch: ForwardBatch) -> torch.Tensor | None:
        if self.decode.fits(plan):
            self.decode.replay(batch, plan.num_seqs)
        else:
            family = next((f for f in self.prefill if f.fits(plan)), None)
            if family is None:
                return None
            family.replay(batch, plan.num_tokens)
        return self.logits[: plan.num_logits_rows]

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        pool = None
        with torch.cuda.stream(stream):
            for family in (self.decode, *reversed(self.prefill)):  # the widest first
                pool = family.capture(self.model, self.cache, self.logits, pool, stream)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        prefill = "".join(f"; prefill/mixed steps of <= {f.max_seqs} sequences, {f.sizes[0]}..{f.max_tokens} tokens "
                          f"({len(f.sizes)})" for f in self.prefill)
        logger.info("captured CUDA graphs: decode batch 1..%d (%d)%s in %.1f s", self.decode.max_batch,
                    len(self.decode.sizes), prefill, time.perf_counter() - start)
