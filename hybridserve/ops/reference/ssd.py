"""Mamba-2 SSM: chunked SSD scan for prefill chunks, single-step state update for decode.

Per head h (group g = h // (H/G)), with dt = softplus(dt_raw + dt_bias) and A = -exp(A_log) < 0:
    state = state * exp(dt * A) + dt * outer(x, B)         [P, N]
    y     = state @ C + D * x                               [P]
State math in float32; the state is stored in its cache dtype (float32, bfloat16 or float16),
rounded to nearest, or stochastically when `state_seed` is given and the dtype is 16-bit (see
rounding.py; the noise is keyed by each written state's position, seq_lens - 1).
The ops take `A_log` and compute A themselves (no separate kernel per layer and step).
No dt clamp (time_step_limit = (0, inf)).

`ssd_recurrent` is the token-by-token oracle the chunked scan is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.ops.reference.rounding import round_state, state_noise


def ssd_varlen(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    ssm_state: torch.Tensor,
    state_slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    chunk_size: int,
    state_seed: int | None = None,
) -> torch.Tensor:
    """Chunked SSD over each sequence of a packed batch.

    x: [T, H, P]; dt_raw: [T, H]; A_log: [H] float32 (A = -exp(A_log)); B, C: [T, G, N]; D, dt_bias: [H];
    cu_seqlens: [B+1] int32; seq_lens: [B] int32 (tokens of each sequence after this chunk: the final
    state belongs to position seq_lens - 1); ssm_state: [S, H, P, N], read for sequences with
    has_initial_state, overwritten in place with each sequence's final state; state_slots: [B] int64;
    has_initial_state: [B] bool; state_seed: int in [0, 2^31) for stochastic rounding of a 16-bit
    state, or None (round to nearest). A sequence with no tokens leaves its slot alone. Returns
    y [T, H, P] in x's dtype.
    """
    y = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    finals, written = [], []
    for b, slot in enumerate(state_slots.tolist()):
        s, e = cu[b], cu[b + 1]
        if s == e:
            continue  # no tokens (CUDA-graph padding): the slot is left alone
        state = ssm_state[slot].float() if bool(has_initial_state[b]) else x.new_zeros(ssm_state.shape[1:], dtype=torch.float32)
        ys, state = _ssd_one(x[s:e], dt_raw[s:e], A_log, B[s:e], C[s:e], D, dt_bias, state, chunk_size)
        y[s:e] = ys.to(x.dtype)
        finals.append(state)
        written.append(b)
    if finals:
        rows = torch.tensor(written, device=state_slots.device)
        ssm_state[state_slots[rows]] = _round(torch.stack(finals), ssm_state.dtype, state_seed, seq_lens[rows])
    return y


def selective_state_update(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    seq_lens: torch.Tensor,
    ssm_state: torch.Tensor,
    state_slots: torch.Tensor,
    state_seed: int | None = None,
) -> torch.Tensor:
    """One decode token per sequence.

    x: [B, H, P]; dt_raw: [B, H]; A_log: [H] float32 (A = -exp(A_log)); B, C: [B, G, N]; D, dt_bias: [H];
    seq_lens: [B] int32 (the token sits at position seq_lens - 1); ssm_state: [S, H, P, N] updated in
    place at rows state_slots [B]; state_seed: int in [0, 2^31) for stochastic rounding of a 16-bit
    state, or None (round to nearest). Returns y [B, H, P] in x's dtype.
    """
    h = x.shape[1]
    rep = h // B.shape[1]
    dt = F.softplus(dt_raw.float() + dt_bias.float())  # [B, H]
    Bh = B.float().repeat_interleave(rep, dim=1)  # [B, H, N]
    Ch = C.float().repeat_interleave(rep, dim=1)
    xf = x.float()
    state = ssm_state[state_slots].float()  # [B, H, P, N]
    decay = torch.exp(dt * _A(A_log))  # [B, H]
    state = state * decay[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    ssm_state[state_slots] = _round(state, ssm_state.dtype, state_seed, seq_lens)
    y = (state * Ch[:, :, None, :]).sum(-1) + D.float()[None, :, None] * xf
    return y.to(x.dtype)


def ssd_recurrent(x, dt_raw, A_log, B, C, D, dt_bias, state):
    """Oracle: the recurrence token by token for one sequence. x [L, H, P], state [H, P, N] float32.

    Returns (y [L, H, P] float32, final state [H, P, N] float32).
    """
    ys = []
    state = state.float().clone()
    slot = torch.zeros(1, dtype=torch.int64, device=x.device)
    for t in range(x.shape[0]):
        cache = state[None].clone()
        pos = torch.full((1,), t + 1, dtype=torch.int32, device=x.device)
        y = selective_state_update(x[t : t + 1].float(), dt_raw[t : t + 1], A_log, B[t : t + 1].float(),
                                   C[t : t + 1].float(), D, dt_bias, pos, cache, slot)
        state = cache[0]
        ys.append(y[0])
    return torch.stack(ys), state


def _A(A_log: torch.Tensor) -> torch.Tensor:
    return -torch.exp(A_log.float())


def _round(state: torch.Tensor, dtype: torch.dtype, seed: int | None, seq_lens: torch.Tensor) -> torch.Tensor:
    """States [B, H, P, N] float32 in the cache dtype (stochastic when seeded and 16-bit)."""
    noise = None
    if seed is not None and dtype != torch.float32:
        noise = state_noise(seed, seq_lens.long() - 1, tuple(state.shape[1:]))
    return round_state(state, dtype, noise)


def _ssd_one(x, dt_raw, A_log, B, C, D, dt_bias, state, chunk_size):
    """Chunked SSD for one sequence: x [L, H, P], state [H, P, N] float32 -> (y [L, H, P] f32, state)."""
    length, h, _ = x.shape
    rep = h // B.shape[1]
    xf = x.float()
    dt = F.softplus(dt_raw.float() + dt_bias.float())  # [L, H]
    Bh = B.float().repeat_interleave(rep, dim=1)  # [L, H, N]
    Ch = C.float().repeat_interleave(rep, dim=1)
    a = dt * _A(A_log)  # [L, H] log-decay per step (<= 0)
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
