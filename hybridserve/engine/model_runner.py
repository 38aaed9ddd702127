"""ModelRunner: owns the model, the cache memory and the sampler; runs one ScheduledBatch.

Start-up: load the weights, measure what memory is left (GPU: `gpu_memory_utilization` of the card
minus weights, other processes and the activation peak of a warm-up step at
`max_num_batched_tokens`; CPU: `cpu_cache_bytes`), give `max_num_seqs` Mamba state slots their
share and the rest to KV blocks. One extra slot and one extra block are kept out of the pools as
padding targets (for CUDA-graph batch padding). The sizes are returned to the engine through
`num_slots` / `num_blocks`, never written into a config.

Per step: ScheduledBatch -> ForwardBatch (packed with numpy from the persistent host BlockTable;
two host->device copies) or a decode CUDA graph -> model -> sampler -> one device->host copy.
"""

from __future__ import annotations

import logging
from itertools import chain

import numpy as np
import torch

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.block_table import BlockTable
from hybridserve.engine.cuda_graphs import DecodeGraphs
from hybridserve.engine.outputs import TokenLogprob
from hybridserve.engine.request import Request
from hybridserve.engine.sampler import Sampler, SamplingMetadata
from hybridserve.engine.scheduler import Fork, ScheduledBatch
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 8192
MAX_GRAPH_BATCH = 512


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    if config.max_model_len is not None:
        if config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's limit {model_config.max_position_embeddings}"
            )
        return config.max_model_len
    return min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)


class ModelRunner:
    """Model + HybridCache + Sampler on one device."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: torch.nn.Module | None = None) -> None:
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        self.dtype = _DTYPES[model_config.torch_dtype if config.dtype == "auto" else config.dtype]
        ssm_name = model_config.mamba_ssm_cache_dtype if config.mamba_ssm_cache_dtype == "auto" else config.mamba_ssm_cache_dtype
        self.ssm_dtype = _DTYPES[ssm_name]
        if config.kv_cache_dtype != "auto":
            logger.warning("kv_cache_dtype %s is not supported yet; keeping KV in %s", config.kv_cache_dtype, self.dtype)
        self.block_size = config.block_size
        self.max_model_len = resolve_max_model_len(config, model_config)
        if model is None:
            from hybridserve.model.loader import load_model

            model = load_model(model_config, load_format=config.load_format, dtype=self.dtype, device=self.device)
        self.model = model
        self.sampler = Sampler(self.device)
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        self.max_graph_batch = min(config.max_num_seqs, MAX_GRAPH_BATCH)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.num_slots, self.num_blocks = self._cache_sizes()
        self.cache = HybridCache.allocate(
            model_config, self.num_slots + 1, self.num_blocks + 1, self.block_size, self.dtype, self.ssm_dtype, self.device
        )
        self.pad_slot, self.pad_block = self.num_slots, self.num_blocks
        self.block_table = BlockTable(self.num_slots + 1, self.max_blocks_per_seq, self.block_size, self.pad_block)
        kv_tokens = self.num_blocks * self.block_size
        logger.info(
            "cache: %d KV blocks x %d tokens = %d tokens of KV, %d Mamba state slots (SSM state %s); "
            "max concurrency %d requests of %d tokens",
            self.num_blocks, self.block_size, kv_tokens, self.num_slots, ssm_name,
            min(self.num_slots, kv_tokens // self.max_model_len), self.max_model_len,
        )
        self.decode_graphs = None
        if self.use_graphs:
            self.decode_graphs = DecodeGraphs(
                self.model, self.cache, self.block_table, max_batch=self.max_graph_batch, pad_slot=self.pad_slot
            )

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[int], list[list[TokenLogprob] | None] | None]:
        """Run the batch; returns the sampled token ids (one per sampled row, batch order) and
        their logprob entries (None when no row asked)."""
        reqs = batch.requests
        if self.decode_graphs is not None and self._graph_ready(batch):
            logits, rows = self.decode_graphs.run(reqs), reqs
        else:
            logits, rows = self._run_eager(batch)
        if not rows:
            return [], None
        meta = SamplingMetadata.build(rows, self.device)
        host = self.sampler(logits, meta).tolist()  # the step's one device->host copy
        return Sampler.unpack(host, meta)

    def _graph_ready(self, batch: ScheduledBatch) -> bool:
        """A pure decode of continuing sequences, one sample each, within the captured sizes."""
        return (
            len(batch) <= self.max_graph_batch
            and batch.is_decode
            and all(s == 1 for s in batch.num_samples)
        )

    def _run_eager(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request]]:
        """Any batch: pack it, run the model; returns logits of the sampled rows and their requests
        (a request finishing its prompt with forks samples one row per choice)."""
        reqs = batch.requests
        b = len(reqs)
        lens = np.array(batch.num_new_tokens, dtype=np.int64)
        cached = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
        slots = self.block_table.sync(reqs)
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        seq_index = np.repeat(np.arange(b), lens)
        positions = np.arange(cu[-1]) - cu[:-1][seq_index] + cached[seq_index]
        slot_mapping = self.block_table.slot_mapping(slots, positions, seq_index)
        input_ids = np.fromiter(
            chain.from_iterable(r.token_ids[c : c + n] for r, c, n in zip(reqs, cached.tolist(), batch.num_new_tokens)),
            dtype=np.int64, count=int(cu[-1]),
        )
        rows: list[Request] = []
        logits_indices: list[int] = []
        for r, end, s in zip(reqs, cu[1:].tolist(), batch.num_samples):
            if s:
                rows += [r, *r.forks[: s - 1]]
                logits_indices += [end - 1] * s
        # one host->device copy for the 1-D inputs, one for the block tables
        flat = np.concatenate([input_ids, slot_mapping, cu, cached + lens, slots, cached > 0,
                               np.array(logits_indices, dtype=np.int64)])
        dev = torch.from_numpy(flat).to(self.device, non_blocking=True)
        t = int(cu[-1])
        parts = dev.split([t, t, b + 1, b, b, b, len(logits_indices)])
        width = max(1, max(len(r.block_ids) for r in reqs))
        tables = torch.from_numpy(self.block_table.table[slots, :width]).to(self.device, non_blocking=True)
        forward_batch = ForwardBatch(
            input_ids=parts[0],
            cu_seqlens=parts[2].to(torch.int32),
            seq_lens=parts[3].to(torch.int32),
            state_slots=parts[4],
            has_initial_state=parts[5].bool(),
            block_tables=tables,
            slot_mapping=parts[1],
            logits_indices=parts[6],
            is_decode=batch.is_decode,
        )
        return self.model(forward_batch, self.cache), rows

    @torch.inference_mode()
    def apply_forks(self, forks: list[Fork]) -> None:
        """n > 1: copy each parent's Mamba state and prompt KV blocks into its sibling's."""
        src_blocks, dst_blocks = [], []
        for f in forks:
            self.cache.copy_slot(f.src_slot, f.dst_slot)
            src_blocks += f.src_blocks
            dst_blocks += f.dst_blocks
        if src_blocks:
            src = torch.tensor(src_blocks, dtype=torch.int64, device=self.device)
            dst = torch.tensor(dst_blocks, dtype=torch.int64, device=self.device)
            self.cache.kv[:, :, dst] = self.cache.kv[:, :, src]

    # ---- start-up ------------------------------------------------------------------------------
    def _cache_sizes(self) -> tuple[int, int]:
        """(state slots, KV blocks) that fit the memory budget, one padding slot and block excluded.

        A slot is only useful with KV to grow into, so slots are sized so that every running
        sequence can reach max_model_len (at most max_num_seqs of them); the rest goes to KV.
        With `num_kv_blocks` set, the blocks are fixed and the slots take what is left.
        """
        slot_bytes = HybridCache.bytes_per_slot(self.model_config, self.dtype, self.ssm_dtype)
        block_bytes = HybridCache.bytes_per_block(self.model_config, self.block_size, self.dtype)
        budget = self._memory_budget() - slot_bytes - block_bytes
        fixed_blocks = self.config.num_kv_blocks
        if fixed_blocks is None:
            room_for_slots = budget // (slot_bytes + self.max_blocks_per_seq * block_bytes)
        else:
            room_for_slots = (budget - fixed_blocks * block_bytes) // slot_bytes
        num_slots = min(self.config.max_num_seqs, room_for_slots)
        if num_slots < 1:
            raise RuntimeError(
                f"not enough memory for the cache: {max(budget, 0) / 2**20:.1f} MiB left, one sequence of "
                f"{self.max_model_len} tokens needs {(slot_bytes + self.max_blocks_per_seq * block_bytes) / 2**20:.1f} MiB; "
                "lower max_model_len or raise gpu_memory_utilization / cpu_cache_bytes"
            )
        num_blocks = fixed_blocks or (budget - num_slots * slot_bytes) // block_bytes
        return int(num_slots), int(num_blocks)

    def _memory_budget(self) -> int:
        """Bytes the cache may use."""
        if self.device.type != "cuda":
            return self.config.cpu_cache_bytes
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warm_up()
        step_peak = torch.cuda.max_memory_allocated(self.device) - base
        graph_pool = 0  # decode graphs keep their activations in a pool of their own
        if self.use_graphs:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._warm_up_decode()
            graph_pool = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free  # weights, other processes, the CUDA context
        logger.info("memory: %.2f GiB in use, step peak %.2f GiB, decode graphs %.2f GiB",
                    used / 2**30, step_peak / 2**30, graph_pool / 2**30)
        return int(total * self.config.gpu_memory_utilization - used - step_peak - graph_pool)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One step at max_num_batched_tokens (and a full sampler pass) on a scratch cache, for the
        activation peak."""
        tokens = self.config.max_num_batched_tokens
        lengths = []
        while sum(lengths) < tokens:
            lengths.append(min(self.max_model_len, tokens - sum(lengths)))
        tables, next_block = [], 0
        for n in lengths:
            nb = -(-n // self.block_size)
            tables.append(list(range(next_block, next_block + nb)))
            next_block += nb
        scratch = HybridCache.allocate(
            self.model_config, len(lengths), next_block, self.block_size, self.dtype, self.ssm_dtype, self.device
        )
        batch = ForwardBatch.build(
            [[0] * n for n in lengths], [0] * len(lengths), list(range(len(lengths))), tables, self.block_size, self.device
        )
        rows = min(tokens, self.config.max_num_seqs)
        batch.logits_indices = torch.arange(rows, device=self.device)
        logits = self.model(batch, scratch)
        probe = Request("warm-up", [0], SamplingParams(top_p=0.9, logprobs=5), max_tokens=1)
        self.sampler(logits, SamplingMetadata.build([probe] * rows, self.device))
        del scratch, logits

    @torch.inference_mode()
    def _warm_up_decode(self) -> None:
        """One eager decode step at the largest graph batch (every row on one scratch slot)."""
        n = self.max_graph_batch
        scratch = HybridCache.allocate(self.model_config, 1, 1, self.block_size, self.dtype, self.ssm_dtype, self.device)
        batch = ForwardBatch.build([[0]] * n, [1] * n, [0] * n, [[0, 0]] * n, self.block_size, self.device)
        self.model(batch, scratch)
        del scratch

