"""Depthwise causal conv1d + SiLU of the Mamba-2 mixer, over packed ragged sequences.

The conv state of a sequence is its last K-1 *raw* (pre-conv) input rows, kept in a slot of
`conv_state [S, K-1, C]`. Sequences without initial state start from zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    conv_state: torch.Tensor,
    state_slots: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Causal conv over each sequence of a packed batch, then SiLU.

    x: [T, C] raw xBC rows of all sequences; weight: [C, K]; bias: [C] or None;
    cu_seqlens: [B+1] int32; conv_state: [S, K-1, C], read for sequences with has_initial_state and
    updated in place for every sequence (its last K-1 raw rows, older state shifted in when the
    sequence is shorter than K-1); state_slots: [B] int64; has_initial_state: [B] bool.
    Returns [T, C] in x's dtype: out[t] = silu(bias + sum_k weight[:, k] * window[t + k]) where the
    window is the K-1 state rows followed by the sequence's rows.
    """
    k = weight.shape[1]
    out = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(state_slots.tolist()):
        rows = x[cu[b] : cu[b + 1]]
        init = conv_state[slot] if bool(has_initial_state[b]) else torch.zeros_like(conv_state[slot])
        window = torch.cat([init.to(x.dtype), rows], dim=0)  # [K-1+L, C]
        out[cu[b] : cu[b + 1]] = _conv_window(window, weight, bias, len(rows))
        conv_state[slot] = window[-(k - 1) :].to(conv_state.dtype)
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence: shift the window, convolve, SiLU.

    x: [B, C]; weight: [C, K]; bias: [C] or None; conv_state: [S, K-1, C] updated in place;
    state_slots: [B] int64. Returns [B, C] in x's dtype.
    """
    k = weight.shape[1]
    window = torch.cat([conv_state[state_slots].to(x.dtype), x[:, None, :]], dim=1)  # [B, K, C]
    acc = (window.float() * weight.float().t()[None]).sum(1)
    if bias is not None:
        acc = acc + bias.float()
    conv_state[state_slots] = window[:, -(k - 1) :].to(conv_state.dtype)
    return F.silu(acc).to(x.dtype)


def _conv_window(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """Outputs for the last n rows of `window` [K-1+n, C] (fp32 accumulate)."""
    k = weight.shape[1]
    w = window.float()
    acc = sum(w[j : j + n] * weight[:, j].float() for j in range(k))
    if bias is not None:
        acc = acc + bias.float()
    return F.silu(acc).to(window.dtype)
