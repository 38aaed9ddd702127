"""Shared helpers of the model tests: small random NemotronH configs, a transformers twin with
every parameter randomised, and one-call ways to run our model over sequences."""

from __future__ import annotations

import math

import torch

from hybridserve.config import ModelConfig
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.nemotron_h import NemotronHForCausalLM


def tiny_config(pattern: str = "ME*EM-*E", chunk_size: int = 8, **overrides) -> dict:
    """A raw config.json dict (HF keys) of a small NemotronH; HF's dt clamp made a no-op."""
    raw = dict(
        architectures=["NemotronHForCausalLM"],
        model_type="nemotron_h",
        torch_dtype="float32",
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=len(pattern),
        hybrid_override_pattern=pattern,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=chunk_size,
        use_conv_bias=True,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        intermediate_size=40,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        time_step_min=1e-9,  # HF's torch path clamps dt at time_step_min; the spec does not
        time_step_floor=1e-10,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    raw.update(overrides)
    return raw


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random at a scale that keeps activations O(1) — including the ones HF
    initialises to constants (norm weights, D, correction bias), so a swapped role would show."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=gen)

    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if not p.is_floating_point():
            continue
        if name.endswith("A_log"):
            v = torch.log(torch.rand(p.shape, generator=gen) * 7 + 1)
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            v = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith(("norm.weight", "norm_f.weight")):
            v = 1 + 0.2 * rand(p.shape)
        elif name.endswith((".D", "conv1d.bias")):
            v = 0.5 * rand(p.shape)
        elif name.endswith("e_score_correction_bias"):
            v = 0.5 * rand(p.shape)
        elif name.endswith("embeddings.weight"):
            v = rand(p.shape)
        elif name.endswith("conv1d.weight"):
            v = rand(p.shape) / p.shape[-1] ** 0.5
        else:  # linear weights [.., out, in]
            v = rand(p.shape) / p.shape[-1] ** 0.5
        p.copy_(v.to(p.dtype))


def hf_model(raw: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    """transformers' NemotronHForCausalLM for `raw`, randomised, in eval mode."""
    from transformers import NemotronHConfig
    from transformers import NemotronHForCausalLM as HFModel

    model = HFModel(NemotronHConfig(**raw)).eval()
    randomize_(model, seed)
    return model.to(dtype)


def ours_from_hf(hf, raw: dict, dtype: torch.dtype) -> NemotronHForCausalLM:
    """Our model with the transformers model's weights (in-memory names use `model.`)."""
    model = NemotronHForCausalLM(ModelConfig.from_dict(raw), dtype)
    sd = {"backbone." + k[len("model.") :] if k.startswith("model.") else k: v for k, v in hf.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def new_cache(model: NemotronHForCausalLM, num_slots: int = 8, num_blocks: int = 32, block_size: int = 4,
              kv_dtype: torch.dtype | None = None):
    return HybridCache.allocate(model.config, num_slots, num_blocks, block_size, model.dtype, kv_dtype=kv_dtype)


@torch.no_grad()
def logits_of(model: NemotronHForCausalLM, ids: list[int], block_size: int = 4,
              kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """All-position logits [T, V] of one sequence run from scratch in one step (KV pages in kv_dtype,
    default the model's)."""
    cache = new_cache(model, num_blocks=len(ids) // block_size + 1, block_size=block_size, kv_dtype=kv_dtype)
    table = list(range(len(ids) // block_size + 1))
    batch = ForwardBatch.build([ids], [0], [0], [table], block_size, logits="all")
    return model(batch, cache)
