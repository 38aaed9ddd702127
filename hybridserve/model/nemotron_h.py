"""NemotronH (hybrid Mamba-2 + attention + MoE) in PyTorch, over packed ragged batches.

embed -> [pre-norm, mixer, residual add] per layer -> norm_f -> lm_head. Each layer holds exactly one
mixer, chosen by its pattern char: M Mamba-2, * attention (no positional encoding), E sigmoid-routed
MoE of squared-ReLU experts plus a shared expert, - dense squared-ReLU MLP. The math of every hot op
comes from `ops` (reference or Triton, picked once by device); this file only wires shapes.

Parameter names follow the Hugging Face checkpoint (`backbone.layers.{i}.mixer...`), except that the
routed experts are stacked: `mixer.experts.up_proj [E, I, hidden]`, `mixer.experts.down_proj
[E, hidden, I]`. Router weights, `A_log`, `D` and `dt_bias` are kept in float32. Every projection is
a `Linear` / `Experts` of `model/linear.py` (dense or fp8, with its tensor-parallel split); the
model is built on the meta device, given its weight formats, then allocated once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.config import ModelConfig
from hybridserve.model import linear
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.linear import COLUMN, FP8_DTYPE, REPLICATED, ROW, Experts, Linear, Split, WeightFormat
from hybridserve.ops import get_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index  # index among the Mamba layers (its state-cache row)
        gn = cfg.n_groups * cfg.ssm_state_size
        # z | x | B | C | dt, each part cut evenly across TP ranks (heads and groups stay whole)
        self.in_proj = Linear(cfg.hidden_size, cfg.in_proj_dim,
                              Split(0, (cfg.d_inner, cfg.d_inner, gn, gn, cfg.mamba_num_heads)))
        conv_split = Split(0, (cfg.d_inner, gn, gn))  # x | B | C channels
        self.splits = {"conv1d.weight": conv_split, "conv1d.bias": conv_split, "A_log": COLUMN, "D": COLUMN,
                       "dt_bias": COLUMN, "norm.weight": COLUMN}  # per head; the gated norm per group
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.use_conv_bias)
        self.A_log = nn.Parameter(torch.zeros(cfg.mamba_num_heads, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(cfg.mamba_num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(cfg.mamba_num_heads, dtype=torch.float32))
        self.norm = RMSNorm(cfg.d_inner)
        self.out_proj = Linear(cfg.d_inner, cfg.hidden_size, ROW)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, ops) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        gn = cfg.n_groups * cfg.ssm_state_size
        z, xbc, dt = self.in_proj(x, ops).split([cfg.d_inner, cfg.conv_dim, cfg.mamba_num_heads], dim=-1)
        conv_w = self.conv1d.weight.view(cfg.conv_dim, cfg.conv_kernel)
        conv_state, ssm_state = cache.conv_state[self.index], cache.ssm_state[self.index]
        seed = cache.state_seed(self.index)
        if batch.is_decode:
            y = ops.mamba_decode_step(xbc, dt, conv_w, self.conv1d.bias, self.A_log, self.D, self.dt_bias,
                                      batch.seq_lens, conv_state, ssm_state, batch.state_slots, seed)
        else:
            capture = batch.capture  # prefix-cache snapshots inside this step's chunks
            if capture is not None:
                capture.save_conv(xbc, conv_state, batch.state_slots, batch.has_initial_state)
            xbc = ops.causal_conv1d(xbc, conv_w, self.conv1d.bias, batch.cu_seqlens, batch.seq_lens, conv_state,
                                    batch.state_slots, batch.has_initial_state)
            xs, B, C = xbc.split([cfg.d_inner, gn, gn], dim=-1)
            ssd_in = (xs.reshape(t, cfg.mamba_num_heads, cfg.mamba_head_dim), dt, self.A_log,
                      B.reshape(t, cfg.n_groups, cfg.ssm_state_size), C.reshape(t, cfg.n_groups, cfg.ssm_state_size),
                      self.D, self.dt_bias)
            if capture is None:
                y = ops.ssd_varlen(*ssd_in, batch.cu_seqlens, batch.seq_lens, ssm_state, batch.state_slots,
                                   batch.has_initial_state, cfg.chunk_size, seed)
            else:
                y = capture.ssd(ops.ssd_varlen, *ssd_in, ssm_state, cfg.chunk_size, seed)
        y = ops.gated_rms_norm(y.reshape(t, cfg.d_inner), z, self.norm.weight, cfg.d_inner // cfg.n_groups,
                               cfg.layer_norm_epsilon)
        return self.out_proj(y, ops)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index  # index among the attention layers (its KV-cache row)
        kv_split = Split(0, max_parts=cfg.num_key_value_heads)  # beyond that many ranks kv heads are copied
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, COLUMN, quantizable=False)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, kv_split, quantizable=False)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, kv_split, quantizable=False)
        self.o_proj = Linear(q_dim, cfg.hidden_size, ROW, quantizable=False)
        # dequantization scales (k, v) of a float8 KV cache: the checkpoint's k_scale / v_scale, else 1
        self.register_buffer("kv_scale", torch.ones(2, dtype=torch.float32), persistent=False)

    KV_SCALE_KINDS = ("k_proj.k_scale", "v_proj.v_scale")  # ModelOpt's names (vLLM's too)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, ops) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        q = self.q_proj(x, ops).view(t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x, ops).view(t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x, ops).view(t, cfg.num_key_value_heads, cfg.head_dim)
        kv = cache.kv[self.index]
        kv_scale = self.kv_scale if kv.dtype == FP8_DTYPE else None
        ops.store_kv(k, v, kv, batch.slot_mapping, kv_scale)
        o = ops.paged_attention(q, kv, batch.block_tables, batch.cu_seqlens, batch.seq_lens, cfg.head_dim**-0.5,
                                kv_scale)
        return self.o_proj(o.reshape(t, -1), ops)

    @torch.no_grad()
    def load(self, kind: str, tensor: torch.Tensor, expert: int | None = None) -> list[str]:
        """A KV-cache scale (kind k_proj.k_scale / v_proj.v_scale): one float."""
        if kind not in self.KV_SCALE_KINDS or expert is not None:
            raise ValueError("unexpected tensor (the model has no such parameter)")
        if tensor.numel() != 1 or not tensor.is_floating_point():
            raise ValueError(f"unsupported KV-cache scale ({tensor.dtype} {list(tensor.shape)}; expected one float)")
        self.kv_scale[self.KV_SCALE_KINDS.index(kind)] = tensor.reshape(()).float()
        return [kind]

    def checkpoint_tensors(self, prefix: str):
        """The KV-cache scales, when they are not the default 1 (the projections are Linear modules)."""
        if not self.kv_scale.is_meta and bool((self.kv_scale != 1).any()):
            for kind, scale in zip(self.KV_SCALE_KINDS, self.kv_scale):
                yield f"{prefix}.{kind}", scale


class MLP(nn.Module):
    """Non-gated squared-ReLU MLP: down(relu(up(x))^2). Dense `-` layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = Linear(hidden, intermediate, COLUMN)
        self.down_proj = Linear(intermediate, hidden, ROW)

    def forward(self, x: torch.Tensor, batch, cache, ops) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x, ops)).square(), ops)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, ops) -> torch.Tensor:
        cfg = self.cfg
        logits = F.linear(x.float(), self.gate.weight.float())
        weights, ids = ops.moe_route(
            logits, self.gate.e_score_correction_bias, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
        )
        return self.experts(x, weights, ids, ops) + self.shared_experts(x, batch, cache, ops)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, hidden: int):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.mixer = mixer


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.splits = {"embeddings.weight": COLUMN}  # vocab-parallel
        counters = {"M": 0, "*": 0}
        layers = []
        for kind in cfg.layer_types:
            if kind == "M":
                mixer = Mamba2Mixer(cfg, counters["M"])
            elif kind == "*":
                mixer = Attention(cfg, counters["*"])
            elif kind == "E":
                mixer = MoE(cfg)
            else:
                mixer = MLP(cfg.hidden_size, cfg.intermediate_size)
            counters[kind] = counters.get(kind, 0) + 1
            layers.append(Block(mixer, cfg.hidden_size))
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(cfg.hidden_size)


# Parameters that stay float32 whatever the model dtype (router and SSM parameters).
FP32_PARAM_SUFFIXES = ("gate.weight", "gate.e_score_correction_bias", "A_log", ".D", "dt_bias")
# Modules that load and name their own checkpoint tensors (the rest: one tensor per parameter).
LOADING_MODULES = (*linear.WEIGHT_MODULES, Attention)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 weight_formats: Mapping[str, WeightFormat] | None = None):
        """weight_formats: module name -> format of the Linear / Experts modules that are not dense
        (the loader decides them from the checkpoint or `--quantization`)."""
        super().__init__()
        self.config = cfg
        # Built on the meta device, given its dtypes and formats, then allocated once on `device`: the
        # full model in float32 (126 GB) never exists, and no time goes into an init the loader overwrites.
        with torch.device("meta"):
            self.backbone = Backbone(cfg)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, COLUMN, quantizable=False)  # vocab-parallel
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype)
        for name, fmt in (weight_formats or {}).items():
            module = self.get_submodule(name)
            if not isinstance(module, linear.WEIGHT_MODULES):
                raise ValueError(f"{name} is not a projection (no weight format)")
            module.set_format(fmt)
        self.to_empty(device=device)
        if torch.device(device).type != "meta":
            with torch.no_grad():
                for t in [*self.parameters(), *self.buffers()]:
                    t.zero_()  # deterministic until loaded (load_model) or init_random
                for m in self.modules():
                    if isinstance(m, Attention):
                        m.kv_scale.fill_(1.0)
        self.dtype = dtype
        self.ops = get_ops(device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, batch: ForwardBatch, cache: HybridCache, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [R, V] for rows batch.logits_indices (all T when None),
        written into `logits_out` [R, V] when given (CUDA graphs share one output buffer).

        Mamba layers read/update their state slots and attention layers their KV pages in `cache`.
        """
        ops, eps = self.ops, self.config.layer_norm_epsilon
        h = self.backbone.embeddings(batch.input_ids)
        residual = None
        with ops.forward_scope():  # the layers share their launch metadata
            for layer in self.backbone.layers:
                x, residual = ops.rms_norm(h, layer.norm.weight, eps, residual)
                h = layer.mixer(x, batch, cache, ops)
        h, _ = ops.rms_norm(h, self.backbone.norm_f.weight, eps, residual)
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
        logits = self.lm_head(h, ops)
        return logits.float() if logits_out is None else logits_out.copy_(logits)

    # ---- weights ---------------------------------------------------------------------------------
    def weight_formats(self) -> dict[str, WeightFormat]:
        """Module name -> format of every Linear / Experts module."""
        return {name: m.format for name, m in self.named_modules() if isinstance(m, linear.WEIGHT_MODULES)}

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) of everything a checkpoint of this model holds: HF names, the
        routed experts one tensor per expert, ModelOpt names for fp8 weights and KV-cache scales."""
        for path, m in self.named_modules():
            if isinstance(m, LOADING_MODULES):
                yield from m.checkpoint_tensors(path)
            if not isinstance(m, linear.WEIGHT_MODULES):
                yield from m.named_parameters(prefix=path, recurse=False)

    def tensor_parallel_splits(self) -> dict[str, Split]:
        """Checkpoint name -> how tensor parallelism cuts that tensor (every tensor of
        `checkpoint_tensors`; REPLICATED where every rank holds all of it)."""
        modules = dict(self.named_modules())
        splits = {}
        for name, _ in self.checkpoint_tensors():
            split = REPLICATED
            for path, kind in _owners(name):
                m = modules.get(path)
                if isinstance(m, linear.WEIGHT_MODULES):
                    split = m.split_of(kind)
                    break
                if m is not None and kind in getattr(m, "splits", {}):
                    split = m.splits[kind]
                    break
            splits[name] = split
        return splits

    @torch.no_grad()
    def _fill(self, name: str, p: torch.Tensor, value: torch.Tensor) -> None:
        """Set parameter `name` to the float `value`: copied, or quantized by its module when fp8."""
        if p.dtype != FP8_DTYPE:
            p.copy_(value.to(p.dtype))
            return
        path, kind = name.rsplit(".", 1)
        module = self.get_submodule(path)
        module.load(kind, value.to(self.dtype))  # Linear: weight; Experts: up_proj / down_proj

    @torch.no_grad()
    def init_uniform(self, seed: int = 0, bound: float = 1e-3) -> None:
        """Every tensor uniform in [-bound, bound], as vLLM's dummy loader does. Router scores are then
        all but equal and the correction bias decides: every token picks the same experts."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for name, p in self.named_parameters():
            value = torch.empty(p.shape, dtype=torch.float32 if p.dtype == FP8_DTYPE else p.dtype, device=self.device)
            self._fill(name, p, value.uniform_(-bound, bound, generator=gen))

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        """Random weights of the right shapes (dummy load format, tiny preset): a stable forward pass
        with distinctive logits, not a trained model."""
        # drawn on the model's device: the full model's 31.6B values would take ~10 minutes on a CPU
        # (so the same seed gives different weights on CPU and CUDA)
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        cfg = self.config

        def normal(shape, std: float) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=dev) * std

        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                value = torch.ones(p.shape, device=dev)
            elif name.endswith("A_log"):
                value = torch.log(torch.rand(p.shape, generator=gen, device=dev) * 15 + 1)
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=gen, device=dev) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
                value = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
            elif name.endswith("conv1d.bias") or name.endswith("e_score_correction_bias"):
                value = torch.zeros(p.shape, device=dev)
            elif name.endswith("conv1d.weight"):
                value = normal(p.shape, 1.0 / cfg.conv_kernel)
            elif name == "lm_head.weight":
                value = normal(p.shape, cfg.hidden_size**-0.5)
            elif name.endswith("embeddings.weight"):
                value = normal(p.shape, 1.0)
            else:
                value = normal(p.shape, 0.02)
            self._fill(name, p, value)


def _owners(name: str) -> Iterator[tuple[str, str]]:
    """(module path, kind) candidates of a checkpoint name, the nearest module first:
    a.b.c.weight -> (a.b.c, weight), (a.b, c.weight), (a, b.c.weight)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i]), ".".join(parts[i:])
