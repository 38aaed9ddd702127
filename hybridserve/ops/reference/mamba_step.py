"""One decode token of a Mamba-2 mixer after its in_proj: conv update, SiLU, then the SSM state
update, reading and writing both state slots in place (see conv.py for the conv ring, ssd.py for
the state update). One op so that a GPU runs it as one kernel: alone, the conv update moves a few
MB per layer and costs mostly its launch."""

from __future__ import annotations

import torch

from hybridserve.ops.reference.conv import causal_conv1d_update
from hybridserve.ops.reference.ssd import selective_state_update


def mamba_decode_step(
    xbc: torch.Tensor,
    dt_raw: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    A_log: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    seq_lens: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    state_slots: torch.Tensor,
    state_seed: int | None = None,
) -> torch.Tensor:
    """causal_conv1d_update on xbc, split into x [B, H, P], B and C [B, G, N], then
    selective_state_update; the conv output is rounded to xbc's dtype in between.

    xbc: [B, H*P + 2*G*N] raw conv input (x, B, C channels); dt_raw: [B, H]; conv_weight: [C, K];
    conv_bias: [C] or None; A_log, D, dt_bias: [H] (A = -exp(A_log)); seq_lens: [B] int32;
    conv_state: [S, K, C]; ssm_state: [S, H, P, N]; state_slots: [B] int64; state_seed: int in
    [0, 2^31) for stochastic rounding of a 16-bit SSM state, or None. Returns y [B, H, P] in xbc's dtype.
    """
    nb, h = dt_raw.shape
    p, n = ssm_state.shape[-2:]
    g = (xbc.shape[1] - h * p) // (2 * n)
    conv = causal_conv1d_update(xbc, conv_weight, conv_bias, seq_lens, conv_state, state_slots)
    x, B, C = conv.split([h * p, g * n, g * n], dim=-1)
    return selective_state_update(
        x.reshape(nb, h, p), dt_raw, A_log, B.reshape(nb, g, n), C.reshape(nb, g, n), D, dt_bias, seq_lens,
        ssm_state, state_slots, state_seed,
    )
