"""NemotronH (hybrid Mamba-2 + attention + MoE) in PyTorch, over packed ragged batches.

embed -> [pre-norm, mixer, residual add] per layer -> norm_f -> lm_head. Each layer holds exactly one
mixer, chosen by its pattern char: M Mamba-2, * attention (no positional encoding), E sigmoid-routed
MoE of squared-ReLU experts plus a shared expert, - dense squared-ReLU MLP. The math of every hot op
comes from `ops` (reference or Triton, picked once by device); this file only wires shapes.

Parameter names follow the Hugging Face checkpoint (`backbone.layers.{i}.mixer...`), except that the
routed experts are stacked: `mixer.experts.up_proj [E, I, hidden]`, `mixer.experts.down_proj
[E, hidden, I]`. Router weights, `A_log`, `D` and `dt_bias` are kept in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.config import ModelConfig
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.ops import get_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index  # index among the Mamba layers (its state-cache row)
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_dim, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.use_conv_bias)
        self.A_log = nn.Parameter(torch.zeros(cfg.mamba_num_heads, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(cfg.mamba_num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(cfg.mamba_num_heads, dtype=torch.float32))
        self.norm = RMSNorm(cfg.d_inner)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, ops) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        gn = cfg.n_groups * cfg.ssm_state_size
        z, xbc, dt = self.in_proj(x).split([cfg.d_inner, cfg.conv_dim, cfg.mamba_num_heads], dim=-1)
        conv_w = self.conv1d.weight.view(cfg.conv_dim, cfg.conv_kernel)
        conv_state, ssm_state = cache.conv_state[self.index], cache.ssm_state[self.index]
        seed = cache.state_seed(self.index)
        if batch.is_decode:
            y = ops.mamba_decode_step(xbc, dt, conv_w, self.conv1d.bias, self.A_log, self.D, self.dt_bias,
                                      batch.seq_lens, conv_state, ssm_state, batch.state_slots, seed)
        else:
            xbc = ops.causal_conv1d(xbc, conv_w, self.conv1d.bias, batch.cu_seqlens, batch.seq_lens, conv_state,
                                    batch.state_slots, batch.has_initial_state)
            xs, B, C = xbc.split([cfg.d_inner, gn, gn], dim=-1)
            y = ops.ssd_varlen(
                xs.reshape(t, cfg.mamba_num_heads, cfg.mamba_head_dim), dt, self.A_log,
                B.reshape(t, cfg.n_groups, cfg.ssm_state_size), C.reshape(t, cfg.n_groups, cfg.ssm_state_size),
                self.D, self.dt_bias, batch.cu_seqlens, batch.seq_lens, ssm_state, batch.state_slots,
                batch.has_initial_state, cfg.chunk_size, seed,
            )
        y = ops.gated_rms_norm(y.reshape(t, cfg.d_inner), z, self.norm.weight, cfg.d_inner // cfg.n_groups,
                               cfg.layer_norm_epsilon)
        return self.out_proj(y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index  # index among the attention layers (its KV-cache row)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, ops) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        q = self.q_proj(x).view(t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(t, cfg.num_key_value_heads, cfg.head_dim)
        kv = cache.kv[self.index]
        ops.store_kv(k, v, kv, batch.slot_mapping)
        o = ops.paged_attention(q, kv, batch.block_tables, batch.cu_seqlens, batch.seq_lens, cfg.head_dim**-0.5)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    """Non-gated squared-ReLU MLP: down(relu(up(x))^2). Dense `-` layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, batch=None, cache=None, ops=None) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.up_proj = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: HybridCache, ops) -> torch.Tensor:
        cfg = self.cfg
        logits = F.linear(x.float(), self.gate.weight.float())
        weights, ids = ops.moe_route(
            logits, self.gate.e_score_correction_bias, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
        )
        routed = ops.fused_moe(x, self.experts.up_proj, self.experts.down_proj, weights, ids)
        return routed + self.shared_experts(x)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, hidden: int):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.mixer = mixer


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
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


class NemotronHForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = cfg
        # Built on the meta device, given its dtypes, then allocated once on `device`: the full model
        # in float32 (126 GB) never exists, and no time goes into an init the loader overwrites.
        with torch.device("meta"):
            self.backbone = Backbone(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype)
        self.to_empty(device=device)
        if torch.device(device).type != "meta":
            for p in self.parameters():
                p.data.zero_()  # deterministic until loaded (load_model) or init_random
        self.dtype = dtype
        self.ops = get_ops(device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, batch: ForwardBatch, cache: HybridCache) -> torch.Tensor:
        """Run one step; returns float32 logits [R, V] for rows batch.logits_indices (all T when None).

        Mamba layers read/update their state slots and attention layers their KV pages in `cache`.
        """
        ops, eps = self.ops, self.config.layer_norm_epsilon
        h = self.backbone.embeddings(batch.input_ids)
        residual = None
        for layer in self.backbone.layers:
            x, residual = ops.rms_norm(h, layer.norm.weight, eps, residual)
            h = layer.mixer(x, batch, cache, ops)
        h, _ = ops.rms_norm(h, self.backbone.norm_f.weight, eps, residual)
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
        return self.lm_head(h).float()

    @torch.no_grad()
    def init_uniform(self, seed: int = 0, bound: float = 1e-3) -> None:
        """Every tensor uniform in [-bound, bound], as vLLM's dummy loader does. Router scores are then
        all but equal and the correction bias decides: every token picks the same experts."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for p in self.parameters():
            p.uniform_(-bound, bound, generator=gen)

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        """Random weights of the right shapes (dummy load format, tiny preset): a stable forward pass
        with distinctive logits, not a trained model."""
        # drawn on the model's device: the full model's 31.6B values would take ~10 minutes on a CPU
        # (so the same seed gives different weights on CPU and CUDA)
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        cfg = self.config

        def normal(p: torch.Tensor, std: float) -> None:
            p.copy_((torch.randn(p.shape, generator=gen, device=dev) * std).to(p.dtype))

        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen, device=dev) * 15 + 1))
            elif name.endswith(".D"):
                p.fill_(1.0)
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=gen, device=dev) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith("conv1d.bias") or name.endswith("e_score_correction_bias"):
                p.zero_()
            elif name.endswith("conv1d.weight"):
                normal(p, 1.0 / cfg.conv_kernel)
            elif name == "lm_head.weight":
                normal(p, cfg.hidden_size**-0.5)
            elif name.endswith("embeddings.weight"):
                normal(p, 1.0)
            else:
                normal(p, 0.02)
