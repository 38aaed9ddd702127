"""Triton ops: the same functions, signatures and docstrings as `hybridserve/ops/reference/`, for CUDA
tensors. Only this package imports triton, so the rest of hybridserve imports on a CPU-only machine.
`sample_tokens` and `apply_token_bitmask` (twins of `reference/sampling.py`) are picked up by the engine's sampler on CUDA."""

from hybridserve.ops.triton.attention import paged_attention, store_kv
from hybridserve.ops.triton.batch_meta import forward_scope
from hybridserve.ops.triton.conv import causal_conv1d, causal_conv1d_update
from hybridserve.ops.triton.fp8 import fp8_linear, quantize_fp8
from hybridserve.ops.triton.mamba_step import mamba_decode_step
from hybridserve.ops.triton.moe import fused_moe, moe_route
from hybridserve.ops.triton.norm import gated_rms_norm, rms_norm
from hybridserve.ops.triton.sampling import apply_token_bitmask, sample_tokens
from hybridserve.ops.triton.ssd import selective_state_update, ssd_varlen

__all__ = [
    "apply_token_bitmask",
    "causal_conv1d",
    "causal_conv1d_update",
    "forward_scope",
    "fp8_linear",
    "fused_moe",
    "gated_rms_norm",
    "mamba_decode_step",
    "moe_route",
    "paged_attention",
    "quantize_fp8",
    "rms_norm",
    "sample_tokens",
    "selective_state_update",
    "ssd_varlen",
    "store_kv",
]
