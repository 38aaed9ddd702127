"""ModelRunner: owns the model, the cache memory and the sampler; runs one StepPlan at a time.

Start-up: load the weights, make the memory plan (`memory_plan.py`; GPU: `gpu_memory_utilization`
of the card minus what is in use, the activation peak of a warm-up step at `max_num_batched_tokens`
and the CUDA graphs' pool (an eager step shaped as the largest decode or prefill graph), both
measured with no more rows than the sequences that can fit; CPU:
`cpu_cache_bytes`), set aside the prefix cache's state snapshot rows, give up to `max_num_seqs`
Mamba state slots their share and the rest to KV blocks, and log the plan. One extra slot and one
extra block are kept out of the pools as padding targets (for CUDA-graph batch padding). The sizes go to the engine as the frozen
`CacheLayout` (`self.layout`), never written into a config. The sampler runs
`SAMPLER_CHUNK_ROWS` rows at a time, so its scratch memory does not grow with the batch.

Per step, in two calls so that host work (grammar masks) can run while the GPU computes:
`forward(plan)`: prefix-cache copies -> InputPacker -> ForwardBatch -> the model or a CUDA graph
(`cuda_graphs.py`: pure decodes, small prefill / mixed steps) -> fork and snapshot copies;
`sample(plan, logits)`: the sampler -> tokens into the device token buffer -> a `SamplerOutput`
whose `to_host()` is the step's one device->host copy. The runner never sees a Request.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.cache_manager import CacheLayout
from hybridserve.engine.cuda_graphs import StepGraphs, prefill_families
from hybridserve.engine.input_packer import InputPacker, to_device
from hybridserve.engine.memory_plan import MemoryPlan, fit_cache
from hybridserve.engine.request import Request
from hybridserve.engine.sampler import Sampler, SamplerOutput, SamplingMetadata, prompt_logprob_rows
from hybridserve.engine.step_plan import (
    PROMPT_LOGPROB_ROWS_PER_STEP,
    SamplingInputs,
    StepPlan,
    synthetic_plan,
)
from hybridserve.model.cache import HybridCache
from hybridserve.sampling_params import SamplingParams
from hybridserve.structured.bitmask import StepBitmasks

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 8192
SAMPLER_CHUNK_ROWS = 128  # rows sampled at once: ~0.3 GiB of sampler scratch at a 131k vocabulary


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
        # fp8 KV pages: store_kv quantizes with each layer's kv_scale, attention dequantizes
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        self.state_rounding_seed = config.seed % 2**31 if config.mamba_cache_stochastic_rounding else None
        self.block_size = config.block_size
        self.max_model_len = resolve_max_model_len(config, model_config)
        if model is None:
            from hybridserve.model.loader import load_model

            model = load_model(model_config, load_format=config.load_format, dtype=self.dtype, device=self.device,
                               quantization=config.quantization)
        self.model = model
        self.sampler = Sampler(self.device)
        self.sampler_chunk_rows = SAMPLER_CHUNK_ROWS
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        num_snapshots = config.prefix_cache_snapshots if config.enable_prefix_caching else 0
        plan = self._plan_memory(num_snapshots)
        num_slots, num_blocks = plan.num_slots, plan.num_blocks
        self.max_graph_batch = min(self._graph_limit, num_slots)  # no decode batch is bigger than the slots
        self.layout = CacheLayout(
            block_size=self.block_size, num_blocks=num_blocks, num_slots=num_slots, max_model_len=self.max_model_len,
            kv_dtype=_dtype_name(self.kv_dtype), state_dtype=ssm_name, num_snapshots=num_snapshots,
        )
        # state rows: the slots, one padding slot, then the prefix cache's snapshots (CacheLayout.snapshot_row)
        self.cache = HybridCache.allocate(
            model_config, num_slots + 1 + num_snapshots, num_blocks + 1, self.block_size, self.dtype, self.ssm_dtype,
            self.device, kv_dtype=self.kv_dtype, rounding_seed=self.state_rounding_seed,
        )
        self.pad_slot, self.pad_block = num_slots, num_blocks
        self.packer = InputPacker(num_slots + 1, self.max_blocks_per_seq, self.block_size, self.pad_block, self.device)
        logger.info("%s; KV %d tokens (%s) in blocks of %d, SSM state %s", plan.summary(),
                    num_blocks * self.block_size, _dtype_name(self.kv_dtype), self.block_size, ssm_name)
        self.graphs = None
        if self.use_graphs:
            self.graphs = StepGraphs(
                self.model, self.cache, max_decode_batch=self.max_graph_batch,
                max_prefill_tokens=self._prefill_graph_tokens,
                prefill_while_decoding=self.config.max_prefill_tokens_while_decoding,
                max_blocks_per_seq=self.max_blocks_per_seq, pad_slot=self.pad_slot, pad_block=self.pad_block,
            )

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's forward (and its copies before and after it); returns the logits of its
        sample rows [R, V] on the device, without waiting for them."""
        self._copy_states(plan.slot_copies_before, plan.block_copies_before)  # prefix cache saves / restores
        batch = self.packer.pack(plan)
        logits = None if self.graphs is None else self.graphs.run(plan, batch)
        if logits is None:
            logits = self.model(batch, self.cache)
        self._copy_states(plan.slot_copies, plan.block_copies)  # forks, prompt snapshots
        return logits

    @torch.inference_mode()
    def sample(self, plan: StepPlan, logits: torch.Tensor, bitmasks: StepBitmasks | None = None) -> SamplerOutput:
        """Sample the plan's rows from `forward`'s logits (bitmasks: the grammar rows' token masks)
        and score its prompt-logprob rows; the tokens also go into the token buffer, where the next
        step's decode rows read them."""
        out = self._sample_chunks(logits[: plan.num_samples], plan.sampling, self.packer, bitmasks)
        if len(plan.prompt_logprob_indices):
            targets = to_device(plan.prompt_logprob_targets, self.device)
            out.prompt = prompt_logprob_rows(logits[plan.num_samples :], targets, plan.prompt_logprob_k,
                                             self.sampler_chunk_rows)
        out.start_host_copy()
        return out

    def _sample_chunks(self, logits: torch.Tensor, inputs: SamplingInputs, packer: InputPacker,
                       bitmasks: StepBitmasks | None = None) -> SamplerOutput:
        """The sampler over `sampler_chunk_rows` rows at a time: its scratch memory (sorts, log-softmax,
        [rows, vocab] each) stays bounded however many rows a step samples."""
        if not len(inputs):
            return SamplerOutput(torch.zeros(0, dtype=torch.int64, device=self.device), None, [])
        parts, n = [], self.sampler_chunk_rows
        for start in range(0, len(inputs), n):
            masks = None if bitmasks is None else bitmasks.part(start, start + n)
            meta = SamplingMetadata.build(inputs.rows(start, start + n), self.device, masks, inputs.max_logprobs)
            parts.append(self.sampler(logits[start : start + n], meta))
            packer.store_sampled(meta.slots, parts[-1].token_ids)
        return SamplerOutput.concat(parts)

    def _copy_states(self, slot_copies, block_copies) -> None:
        """State rows and KV blocks [C, 2] (src, dst), each list as one gather-then-scatter."""
        if len(slot_copies):
            src, dst = to_device(slot_copies.T.copy(), self.device)
            self.cache.copy_slots(src, dst)
        if len(block_copies):
            src, dst = to_device(block_copies.T.copy(), self.device)
            self.cache.copy_blocks(src, dst)

    # ---- start-up ------------------------------------------------------------------------------
    @property
    def _graph_limit(self) -> int:
        return self.config.max_cudagraph_capture_size or self.config.max_num_seqs

    @property
    def _prefill_graph_tokens(self) -> int:
        """The largest prefill / mixed step graph: no step has more than max_num_batched_tokens."""
        return min(self.config.max_prefill_graph_tokens, self.config.max_num_batched_tokens)

    def _plan_memory(self, num_snapshots: int) -> MemoryPlan:
        """Split the memory budget (see memory_plan.py), the prefix cache's `num_snapshots` state
        rows set aside first. GPU: the reserves are measured by a warm-up step at
        max_num_batched_tokens and eager steps shaped as the largest decode and prefill graphs, with no more
        rows than the sequences that could fit with no reserve at all."""
        slot_bytes = HybridCache.bytes_per_slot(self.model_config, self.dtype, self.ssm_dtype)
        block_bytes = HybridCache.bytes_per_block(self.model_config, self.block_size, self.kv_dtype)
        fit = partial(fit_cache, slot_bytes=slot_bytes, block_bytes=block_bytes, max_blocks_per_seq=self.max_blocks_per_seq,
                      max_num_seqs=self.config.max_num_seqs, fixed_blocks=self.config.num_kv_blocks)
        snapshots = num_snapshots * slot_bytes
        budget = in_use = weights = step_peak = graphs = rows = graph_batch = graph_tokens = 0
        if self.device.type != "cuda":
            budget = self.config.cpu_cache_bytes
            available = budget - snapshots
        else:
            weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.config.gpu_memory_utilization)
            can_run = fit(budget - (total - free) - snapshots)[0]  # an upper bound: no reserve taken yet
            rows = min(self.config.max_num_batched_tokens, can_run + PROMPT_LOGPROB_ROWS_PER_STEP)  # logits rows
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._warm_up(rows)
            step_peak = torch.cuda.max_memory_allocated(self.device) - base
            if self.use_graphs:  # the graphs keep their activations in one pool of their own: its largest step
                graph_batch = min(self._graph_limit, can_run)
                families = prefill_families(self._prefill_graph_tokens, graph_batch,
                                            self.config.max_prefill_tokens_while_decoding)
                graph_tokens = max((sizes[-1] for _, sizes in families), default=0)
                torch.cuda.reset_peak_memory_stats(self.device)
                self._warm_up_decode(graph_batch)
                for seqs, sizes in families:
                    self._warm_up_prefill_graph(seqs, sizes[-1])
                graphs = torch.cuda.max_memory_allocated(self.device) - base
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            in_use = total - free  # weights, the CUDA context, library workspaces, other processes
            available = budget - in_use - step_peak - graphs - snapshots
        num_slots, num_blocks = fit(available)
        return MemoryPlan(
            budget=budget, in_use=in_use, weights=weights, step_peak=step_peak, sample_rows=rows, graphs=graphs,
            graph_batch=graph_batch, graph_tokens=graph_tokens, num_slots=num_slots, slot_bytes=slot_bytes, num_snapshots=num_snapshots,
            num_blocks=num_blocks, block_bytes=block_bytes, max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
        )

    @torch.inference_mode()
    def _warm_up(self, rows: int) -> None:
        """One step at max_num_batched_tokens sampling `rows` rows with top-p and logprobs (the
        sampler's costliest path) on a scratch cache, for the activation peak."""
        tokens = self.config.max_num_batched_tokens
        lengths = []
        while sum(lengths) < tokens:
            lengths.append(min(self.max_model_len, tokens - sum(lengths)))
        tables, next_block = [], 0
        for n in lengths:
            nb = -(-n // self.block_size)
            tables.append(list(range(next_block, next_block + nb)))
            next_block += nb
        probe = Request("warm-up", [0], SamplingParams(top_p=0.9, logprobs=5), max_tokens=1)
        plan = synthetic_plan([[0] * n for n in lengths], [0] * len(lengths), list(range(len(lengths))), tables,
                              sample_token_indices=list(range(rows)), sample_rows=[probe] * rows)
        self._scratch_step(plan, len(lengths), next_block, max(len(t) for t in tables), sample=True)

    @torch.inference_mode()
    def _warm_up_decode(self, n: int) -> None:
        """One eager decode step of n rows, the largest graph batch (every row on one scratch slot)."""
        self._scratch_step(synthetic_plan([[0]] * n, [1] * n, [0] * n, [[0]] * n), 1, 1, 1, sample=False)

    @torch.inference_mode()
    def _warm_up_prefill_graph(self, seqs: int, tokens: int) -> None:
        """One eager step shaped as the largest graph of a prefill family: `tokens` tokens over `seqs`
        sequences and a padding one, `seqs` logits rows (every sequence on one scratch slot and the
        same blocks: the scratch cache is no part of the peak that matters)."""
        n = seqs + 1
        lengths = [tokens // n] * (n - 1) + [tokens - tokens // n * (n - 1)]
        width = -(-max(lengths) // self.block_size)
        plan = synthetic_plan([[0] * k for k in lengths], [0] * n, [0] * n, [list(range(width))] * n,
                              sample_token_indices=list(range(seqs)))
        self._scratch_step(plan, 1, width, width, sample=False)

    def _scratch_step(self, plan: StepPlan, num_slots: int, num_blocks: int, width: int, *, sample: bool) -> None:
        """Run a plan on a scratch cache, through the same packer and sampler as real steps."""
        scratch = HybridCache.allocate(
            self.model_config, num_slots, num_blocks, self.block_size, self.dtype, self.ssm_dtype, self.device,
            kv_dtype=self.kv_dtype, rounding_seed=self.state_rounding_seed,
        )
        packer = InputPacker(num_slots, width, self.block_size, 0, self.device)
        logits = self.model(packer.pack(plan), scratch)
        if sample:
            self._sample_chunks(logits, plan.sampling, packer)
        del scratch, logits


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
