"""DecodeGraphs: CUDA graphs of pure-decode steps (every sequence feeds one token and carries state).

Eager decode is launch-bound (hundreds of kernels per step), so each padded batch size gets one
captured graph of the whole model forward. All graphs read the same static input buffers, sized
for the largest batch, and share one memory pool (captured largest first). A step of b sequences
replays the graph of the next captured size g >= b; rows b..g-1 are padding that point at the
runner's spare state slot and KV block, so they never touch a live sequence's state. A step's
inputs come packed by the runner's InputPacker (like every step) and are copied into the static
buffers before the replay. Used only on CUDA without `enforce_eager`; the sampler runs after the
replay, outside the graph.
"""

from __future__ import annotations

import logging
import time

import torch

from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, every 16 up to 256, every 32 up to 512, then every 64;
    max_batch itself is always included. Fine steps where padding costs most, coarse ones above
    256, where 64 padded rows are < 25 % of a step: 35 graphs up to 1024 (start-up stays short)."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32), *range(576, max_batch + 1, 64)]
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: HybridCache,
        *,
        max_batch: int,
        max_blocks_per_seq: int,
        pad_slot: int,
        pad_block: int,
    ) -> None:
        self.model, self.cache = model, cache
        self.sizes = capture_sizes(max_batch)
        self.block_size = cache.block_size
        self.pad_slot, self.pad_block = pad_slot, pad_block
        n, device = self.sizes[-1], cache.kv.device
        # static inputs; every row starts out as padding
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.state_slots = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.has_initial_state = torch.ones(n, dtype=torch.bool, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), pad_block * self.block_size, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the graph for this packed pure-decode batch (b sequences, one token and one logits
        row each); returns logits [b, V] (a view of a static buffer)."""
        b = batch.input_ids.shape[0]
        g = next(s for s in self.sizes if s >= b)
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
            self.slot_mapping[b:g] = self.pad_block * self.block_size
            self.block_tables[b:g, 0] = self.pad_block
        self.graphs[g].replay()
        return self.logits[g][:b]

    def _batch(self, g: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:g],
            cu_seqlens=self.cu_seqlens[: g + 1],
            seq_lens=self.seq_lens[:g],
            state_slots=self.state_slots[:g],
            has_initial_state=self.has_initial_state[:g],
            block_tables=self.block_tables[:g],
            slot_mapping=self.slot_mapping[:g],
            logits_indices=self.logits_indices[:g],
            is_decode=True,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for g in reversed(self.sizes):
                batch = self._batch(g)
                self.model(batch, self.cache)  # warm-up: Triton compiles/autotunes outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[g] = self.model(batch, self.cache)
                pool = graph.pool()
                self.graphs[g] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), self.max_batch,
                    time.perf_counter() - start)
