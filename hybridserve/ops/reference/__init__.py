"""Reference ops: plain PyTorch, CPU-runnable, float32 math. They are the specification: every
Triton kernel in `hybridserve/ops/triton/` has the same name, signature and docstring and is tested
against its twin here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hybridserve.ops.reference.attention import paged_attention, store_kv
from hybridserve.ops.reference.conv import causal_conv1d, causal_conv1d_update
from hybridserve.ops.reference.fp8 import fp8_linear, quantize_fp8
from hybridserve.ops.reference.mamba_step import mamba_decode_step
from hybridserve.ops.reference.moe import fused_moe, moe_route
from hybridserve.ops.reference.norm import gated_rms_norm, rms_norm
from hybridserve.ops.reference.ssd import selective_state_update, ssd_varlen


@contextlib.contextmanager
def forward_scope() -> Iterator[None]:
    """One model forward: its layers may share launch metadata derived from the batch (the Triton
    ops do; the reference has none)."""
    yield


__all__ = [
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
    "selective_state_update",
    "ssd_varlen",
    "store_kv",
]
