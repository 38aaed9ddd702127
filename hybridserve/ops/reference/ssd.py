"""Mamba-2 SSM: chunked SSD scan for prefill chunks, single-step state update for decode.

Per head h (group g = h // (H/G)), with dt = softplus(dt_raw + dt_bias) and A = -exp(A_log) < 0:
    state = state * exp(dt * A) + dt * outer(x, B)         [P, N]
    y     = state @ C + D * x                               [P]
State math in float32; the state is stored in its cache dtype (float32, bfloat16 or float16).
No dt clamp (time_step_limit = (0, inf)).

`ssd_recurrent` is the token-by-token oracle the chunked scan is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_varlen(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ssm_state: torch.Tensor,
    state_slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Chunked SSD over each sequence of a packed batch.

    x: [T, H, P]; dt_raw: [T, H]; A: [H] float32 (negative); B, C: [T, G, N]; D, dt_bias: [H];
    cu_seqlens: [B+1] int32; ssm_state: [S, H, P, N], read for sequences with has_initial_state,
    overwritten in place with each sequence's final state; state_slots: [B] int64;
    has_initial_state: [B] bool. Returns y [T, H, P] in x's dtype.
    """
    y = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    for b, slot in enumerate(state_slots.tolist()):
        s, e = cu[b], cu[b + 1]
        state = ssm_state[slot].float() if bool(has_initial_state[b]) else x.new_zeros(ssm_state.shape[1:], dtype=torch.float32)
        ys, state = _ssd_one(x[s:e], dt_raw[s:e], A, B[s:e], C[s:e], D, dt_bias, state, chunk_size)
        y[s:e] = ys.to(x.dtype)
        ssm_state[slot] = state.to(ssm_state.dtype)
    return y


def selective_state_update(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    state_slots: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence.

    x: [B, H, P]; dt_raw: [B, H]; A: [H]; B, C: [B, G, N]; D, dt_bias: [H];
    ssm_state: [S, H, P, N] updated in place at rows state_slots [B]. Returns y [B, H, P] in x's dtype.
    """
    h = x.shape[1]
    rep = h // B.shape[1]
    dt = F.softplus(dt_raw.float() + dt_bias.float())  # [B, H]
    Bh = B.float().repeat_interleave(rep, dim=1)  # [B, H, N]
    Ch = C.float().repeat_interleave(rep, dim=1)
    xf = x.float()
    state = ssm_state[state_slots].float()  # [B, H, P, N]
    decay = torch.exp(dt * A.float())  # [B, H]
    state = state * decay[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    ssm_state[state_slots] = state.to(ssm_state.dtype)
    y = (state * Ch[:, :, None, :]).sum(-1) + D.float()[None, :, None] * xf
    return y.to(x.dtype)


def ssd_recurrent(x, dt_raw, A, B, C, D, dt_bias, state):
    """Oracle: the recurrence token by token for one sequence. x [L, H, P], state [H, P, N] float32.

    Returns (y [L, H, P] float32, final state [H, P, N] float32).
    """
    ys = []
    state = state.float().clone()
    for t in range(x.shape[0]):
        slot = torch.zeros(1, dtype=torch.int64, device=x.device)
        cache = state[None].clone()
        y = selective_state_update(x[t : t + 1].float(), dt_raw[t : t + 1], A, B[t : t + 1].float(),
                                   C[t : t + 1].float(), D, dt_bias, cache, slot)
        state = cache[0]
        ys.append(y[0])
    return torch.stack(ys), state


def _ssd_one(x, dt_raw, A, B, C, D, dt_bias, state, chunk_size):
    """Chunked SSD for one sequence: x [L, H, P], state [H, P, N] float32 -> (y [L, H, P] f32, state)."""
    length, h, _ = x.shape
    rep = h // B.shape[1]
    xf = x.float()
    dt = F.softplus(dt_raw.float() + dt_bias.float())  # [L, H]
    Bh = B.float().repeat_interleave(rep, dim=1)  # [L, H, N]
    Ch = C.float().repeat_interleave(rep, dim=1)
    a = dt * A.float()  # [L, H] log-decay per step (<= 0)
    y = torch.empty_like(xf)
    for s in range(0, length, chunk_size):
        e = min(s + chunk_size, length)
        ac = torch.cumsum(a[s:e], dim=0)  # [Q, H] cumulative log-decay inside the chunk
        # decay from step j to step i (i >= j): exp(ac[i] - ac[j]); masked above the diagonal
        seg = ac[:, None, :] - ac[None, :, :]  # [Q(i), Q(j), H]
        causal = torch.tril(torch.ones(e - s, e - s, dtype=torch.bool, device=x.device))
        decay = torch.exp(seg.masked_fill(~causal[..., None], float("-inf")))
        scores = torch.einsum("ihn,jhn->ijh", Ch[s:e], Bh[s:e]) * decay  # [Q, Q, H]
        dtx = dt[s:e, :, None] * xf[s:e]  # [Q, H, P]
        y_intra = torch.einsum("ijh,jhp->ihp", scores, dtx)
        y_inter = torch.einsum("ihn,hpn->ihp", Ch[s:e], state) * torch.exp(ac)[..., None]
        y[s:e] = y_intra + y_inter + D.float()[None, :, None] * xf[s:e]
        # carry the state to the end of the chunk
        to_end = torch.exp(ac[-1][None, :] - ac)  # [Q, H]
        state = state * torch.exp(ac[-1])[:, None, None] + torch.einsum("jh,jhp,jhn->hpn", to_end, dtx, Bh[s:e])
    return y, state
