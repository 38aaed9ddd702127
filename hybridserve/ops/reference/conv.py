"""Depthwise causal conv1d + SiLU of the Mamba-2 mixer, over packed ragged sequences.

The conv state of a sequence is a ring of its last K *raw* (pre-conv) input rows, kept in a slot
of `conv_state [S, K, C]`: the row at position q lives in ring row q % K (rows of positions < 0 are
zero). A decode step at position p reads the rows of p-K+1..p-1 and writes only row p % K, a row
no reader of the same step needs, so a fused decode kernel can update the state of channels that
many programs read (the B/C channels shared by a group of heads) without ordering its programs.
Sequences without initial state start from zeros. Positions come from `seq_lens` (tokens of each
sequence after this step), as for attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    conv_state: torch.Tensor,
    state_slots: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Causal conv over each sequence of a packed batch, then SiLU.

    x: [T, C] raw xBC rows of all sequences; weight: [C, K]; bias: [C] or None;
    cu_seqlens: [B+1] int32; seq_lens: [B] int32, so sequence b's rows sit at positions
    seq_lens[b] - L_b .. seq_lens[b] - 1; conv_state: [S, K, C] ring, read for sequences with
    has_initial_state and updated in place for every sequence with tokens (afterwards it holds the K
    positions before seq_lens[b]); state_slots: [B] int64; has_initial_state: [B] bool.
    Returns [T, C] in x's dtype: out[t] = silu(bias + sum_k weight[:, k] * window[t + k]) where the
    window is the K-1 rows before the sequence's first position followed by the sequence's rows.
    """
    k = weight.shape[1]
    out = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    for b, (slot, end) in enumerate(zip(state_slots.tolist(), seq_lens.tolist())):
        rows = x[cu[b] : cu[b + 1]]
        if not len(rows):
            continue  # no tokens (CUDA-graph padding): the slot is left alone
        start = end - len(rows)
        ring = conv_state[slot] if bool(has_initial_state[b]) else torch.zeros_like(conv_state[slot])
        before = ring[[(start - k + 1 + j) % k for j in range(k - 1)]]  # positions start-K+1 .. start-1
        window = torch.cat([before.to(x.dtype), rows], dim=0)  # [K-1+L, C], row i at position start-K+1+i
        out[cu[b] : cu[b + 1]] = _conv_window(window, weight, bias, len(rows))
        # the last K positions end-K .. end-1; end-K may precede the window: keep what the ring has
        for q in range(max(end - k, start - k + 1), end):
            ring[q % k] = window[q - start + k - 1].to(conv_state.dtype)
        conv_state[slot] = ring
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_lens: torch.Tensor,
    conv_state: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence: convolve the ring's last K-1 rows and x, SiLU, store x.

    x: [B, C] at positions seq_lens - 1; weight: [C, K]; bias: [C] or None; seq_lens: [B] int32;
    conv_state: [S, K, C] ring, row (seq_lens - 1) % K overwritten with x; state_slots: [B] int64.
    Returns [B, C] in x's dtype.
    """
    k = weight.shape[1]
    pos = seq_lens.long() - 1
    rows = (pos[:, None] + torch.arange(1, k, device=x.device)[None, :]) % k  # positions p-K+1 .. p-1
    before = conv_state[state_slots[:, None], rows]  # [B, K-1, C]
    window = torch.cat([before.to(x.dtype), x[:, None, :]], dim=1)  # [B, K, C]
    acc = (window.float() * weight.float().t()[None]).sum(1)
    if bias is not None:
        acc = acc + bias.float()
    conv_state[state_slots, pos % k] = x.to(conv_state.dtype)
    return F.silu(acc).to(x.dtype)


def _conv_window(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """Outputs for the last n rows of `window` [K-1+n, C] (fp32 accumulate)."""
    k = weight.shape[1]
    w = window.float()
    acc = sum(w[j : j + n] * weight[:, j].float() for j in range(k))
    if bias is not None:
        acc = acc + bias.float()
    return F.silu(acc).to(window.dtype)
