"""ModelRunner: owns the model, the cache memory and the sampler; runs one StepPlan at a time.

Start-up: load the weights, measure what memory is left (GPU: `gpu_memory_utilization` of the card
minus weights, other processes and the activation peak of a warm-up step at
`max_num_batched_tokens`; CPU: `cpu_cache_bytes`), set aside the prefix cache's state snapshot
rows, give `max_num_seqs` Mamba state slots their share and the rest to KV blocks. One extra
slot and one extra block are kept out of the pools as padding targets (for CUDA-graph batch
padding). The sizes go to the engine as the frozen
`CacheLayout` (`self.layout`), never written into a config.

Per step, in two calls so that host work (grammar masks) can run while the GPU computes:
`forward(plan)`: prefix-cache copies -> InputPacker -> ForwardBatch -> the model or a decode CUDA
graph -> fork and snapshot copies;
`sample(plan, logits)`: the sampler -> tokens into the device token buffer -> a `SamplerOutput`
whose `to_host()` is the step's one device->host copy. The runner never sees a Request.
"""

from __future__ import annotations

import logging

import torch

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.cache_manager import CacheLayout
from hybridserve.engine.cuda_graphs import DecodeGraphs
from hybridserve.engine.input_packer import InputPacker
from hybridserve.engine.request import Request
from hybridserve.engine.sampler import Sampler, SamplerOutput, SamplingMetadata
from hybridserve.engine.step_plan import StepPlan, synthetic_plan
from hybridserve.model.cache import HybridCache
from hybridserve.sampling_params import SamplingParams
from hybridserve.structured.bitmask import StepBitmasks

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
    """Model + HybridCache + Sampler on one device; runs StepPlans."""

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
        num_snapshots = config.prefix_cache_snapshots if config.enable_prefix_caching else 0
        num_slots, num_blocks = self._cache_sizes(num_snapshots)
        self.layout = CacheLayout(
            block_size=self.block_size, num_blocks=num_blocks, num_slots=num_slots, max_model_len=self.max_model_len,
            kv_dtype=_dtype_name(self.dtype), state_dtype=ssm_name, num_snapshots=num_snapshots,
        )
        # state rows: the slots, one padding slot, then the prefix cache's snapshots (CacheLayout.snapshot_row)
        self.cache = HybridCache.allocate(
            model_config, num_slots + 1 + num_snapshots, num_blocks + 1, self.block_size, self.dtype, self.ssm_dtype,
            self.device,
        )
        self.pad_slot, self.pad_block = num_slots, num_blocks
        self.packer = InputPacker(num_slots + 1, self.max_blocks_per_seq, self.block_size, self.pad_block, self.device)
        kv_tokens = num_blocks * self.block_size
        logger.info(
            "cache: %d KV blocks x %d tokens = %d tokens of KV, %d Mamba state slots (SSM state %s); "
            "max concurrency %d requests of %d tokens",
            num_blocks, self.block_size, kv_tokens, num_slots, ssm_name,
            min(num_slots, kv_tokens // self.max_model_len), self.max_model_len,
        )
        slot_bytes = HybridCache.bytes_per_slot(model_config, self.dtype, self.ssm_dtype)
        logger.info("prefix cache: %s", f"on, {num_snapshots} Mamba state snapshots x {slot_bytes / 2**20:.1f} MiB = "
                    f"{num_snapshots * slot_bytes / 2**30:.2f} GiB" if num_snapshots else "off")
        self.decode_graphs = None
        if self.use_graphs:
            self.decode_graphs = DecodeGraphs(
                self.model, self.cache, max_batch=self.max_graph_batch, max_blocks_per_seq=self.max_blocks_per_seq,
                pad_slot=self.pad_slot, pad_block=self.pad_block,
            )

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's forward (and its copies before and after it); returns the logits of its
        sample rows [R, V] on the device, without waiting for them."""
        self._copy_states(plan.slot_copies_before, plan.block_copies_before)  # prefix cache saves / restores
        batch = self.packer.pack(plan)
        if self.decode_graphs is not None and self._graph_ready(plan):
            logits = self.decode_graphs.run(batch)
        else:
            logits = self.model(batch, self.cache)
        self._copy_states(plan.slot_copies, plan.block_copies)  # forks, prompt snapshots
        return logits

    @torch.inference_mode()
    def sample(self, plan: StepPlan, logits: torch.Tensor, bitmasks: StepBitmasks | None = None) -> SamplerOutput:
        """Sample the plan's rows from `forward`'s logits (bitmasks: the grammar rows' token masks);
        the tokens also go into the token buffer, where the next step's decode rows read them."""
        meta = SamplingMetadata.build(plan.sampling, self.device, bitmasks)
        out = self.sampler(logits, meta)
        self.packer.store_sampled(meta.slots, out.token_ids)
        return out

    def _graph_ready(self, plan: StepPlan) -> bool:
        """A pure decode of continuing sequences, one sample each, within the captured sizes."""
        return plan.num_seqs <= self.max_graph_batch and plan.is_decode and plan.samples_each_sequence_once

    def _copy_states(self, slot_copies, block_copies) -> None:
        """State rows and KV blocks [C, 2] (src, dst), each list as one gather-then-scatter."""
        if len(slot_copies):
            src, dst = torch.from_numpy(slot_copies.T.copy()).to(self.device)
            self.cache.copy_slots(src, dst)
        if len(block_copies):
            src, dst = torch.from_numpy(block_copies.T.copy()).to(self.device)
            self.cache.copy_blocks(src, dst)

    # ---- start-up ------------------------------------------------------------------------------
    def _cache_sizes(self, num_snapshots: int) -> tuple[int, int]:
        """(state slots, KV blocks) that fit the memory budget, one padding slot and block and the
        prefix cache's `num_snapshots` state rows excluded.

        A slot is only useful with KV to grow into, so slots are sized so that every running
        sequence can reach max_model_len (at most max_num_seqs of them); the rest goes to KV.
        With `num_kv_blocks` set, the blocks are fixed and the slots take what is left.
        """
        slot_bytes = HybridCache.bytes_per_slot(self.model_config, self.dtype, self.ssm_dtype)
        block_bytes = HybridCache.bytes_per_block(self.model_config, self.block_size, self.dtype)
        budget = self._memory_budget() - (1 + num_snapshots) * slot_bytes - block_bytes
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
        rows = min(tokens, self.config.max_num_seqs)
        probe = Request("warm-up", [0], SamplingParams(top_p=0.9, logprobs=5), max_tokens=1)
        plan = synthetic_plan([[0] * n for n in lengths], [0] * len(lengths), list(range(len(lengths))), tables,
                              sample_token_indices=list(range(rows)), sample_rows=[probe] * rows)
        self._scratch_step(plan, len(lengths), next_block, max(len(t) for t in tables), sample=True)

    @torch.inference_mode()
    def _warm_up_decode(self) -> None:
        """One eager decode step at the largest graph batch (every row on one scratch slot)."""
        n = self.max_graph_batch
        self._scratch_step(synthetic_plan([[0]] * n, [1] * n, [0] * n, [[0]] * n), 1, 1, 1, sample=False)

    def _scratch_step(self, plan: StepPlan, num_slots: int, num_blocks: int, width: int, *, sample: bool) -> None:
        """Run a plan on a scratch cache, through the same packer and sampler as real steps."""
        scratch = HybridCache.allocate(
            self.model_config, num_slots, num_blocks, self.block_size, self.dtype, self.ssm_dtype, self.device
        )
        packer = InputPacker(num_slots, width, self.block_size, 0, self.device)
        logits = self.model(packer.pack(plan), scratch)
        if sample:
            self.sampler(logits, SamplingMetadata.build(plan.sampling, self.device))
        del scratch, logits


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
