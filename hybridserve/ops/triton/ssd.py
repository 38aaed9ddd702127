"""Mamba-2 SSM: chunked SSD scan for prefill chunks, single-step state update for decode.

Per head h (group g = h // (H/G)), with dt = softplus(dt_raw + dt_bias) and A = -exp(A_log) < 0:
    state = state * exp(dt * A) + dt * outer(x, B)         [P, N]
    y     = state @ C + D * x                               [P]
State math in float32; the state is stored in its cache dtype (float32, bfloat16 or float16),
rounded to nearest, or stochastically when `state_seed` is given and the dtype is 16-bit (see
rounding.py; the noise is keyed by each written state's position, seq_lens - 1).
The ops take `A_log` and compute A themselves (no separate kernel per layer and step).
No dt clamp (time_step_limit = (0, inf)).

Triton:
- `selective_state_update`: one program per (sequence, head, tile of P rows); the [P-tile, N] state
  is read once, updated in registers and written back in place (memory-bound).
- `ssd_varlen`: one program per (sequence, head, tile of P rows) walks its sequence in chunks of
  BLOCK_T tokens with the [P-tile, N] state in registers. Per chunk: the intra-chunk part
  (C B^T masked by the decay, times dt x), the carried-state part (C state^T scaled by the decay
  from the chunk start) and the state carry (decayed dt x^T B), all with tensor-core dots in
  float32 accumulation. Chunking changes only rounding, so BLOCK_T need not equal chunk_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.rounding import _state_key, _store_state, use_stochastic_rounding


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20); exp(x) alone where 1 + exp(x) would round to 1
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _A(alog_ptr, h):
    """A = -exp(A_log) of head h."""
    return -tl.exp(tl.load(alog_ptr + h).to(tl.float32))


@triton.jit
def _ssu_load(state_ptr, slot, dt_ptr, dtb_ptr, alog_ptr, b, h, ps, ns, pmask, nmask, sdt_b, ss_s, ss_h, ss_p):
    """The [P-tile, N] state of head h in `slot` as float32 (its pointers and mask), dt and the decay.
    Shared by the decode kernels; the big state load is issued first."""
    sptr = state_ptr + slot * ss_s + h * ss_h + ps[:, None] * ss_p + ns[None, :]
    smask = pmask[:, None] & nmask[None, :]
    state = tl.load(sptr, mask=smask, other=0.0).to(tl.float32)
    dt = _softplus(tl.load(dt_ptr + b * sdt_b + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32))
    decay = tl.exp(dt * _A(alog_ptr, h))
    return sptr, smask, state, dt, decay


@triton.jit
def _key_of(seed, lens_ptr, b, SR: tl.constexpr):
    """The rounding key of sequence b's written state (position seq_lens[b] - 1); 0 without SR."""
    if SR:
        return _state_key(seed, tl.load(lens_ptr + b) - 1)
    else:
        return 0


@triton.jit
def _ssu_store(state, sptr, smask, dt, decay, x, bv, cv, d_ptr, h, y_ptrs, pmask, key, idx, SR: tl.constexpr):
    """Update the state tile with x (float32 [P-tile]) and B, store it, store y = state @ C + D x."""
    state = state * decay + (dt * x)[:, None] * bv[None, :]
    _store_state(sptr, smask, state, key, idx, SR)
    y = tl.sum(state * cv[None, :], axis=1) + tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=pmask)


@triton.jit(do_not_specialize=["seed"])
def _ssu_kernel(
    x_ptr, dt_ptr, alog_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, lens_ptr, state_ptr, slots_ptr, y_ptr, seed,
    P, N, HEADS_PER_GROUP,
    sx_b, sx_h, sdt_b, sb_b, sb_g, sc_b, sc_g, ss_s, ss_h, ss_p, sy_b, sy_h,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pmask = ps < P
    nmask = ns < N
    g = h // HEADS_PER_GROUP
    slot = tl.load(slots_ptr + b).to(tl.int64)
    sptr, smask, state, dt, decay = _ssu_load(state_ptr, slot, dt_ptr, dtb_ptr, alog_ptr, b, h, ps, ns, pmask,
                                              nmask, sdt_b, ss_s, ss_h, ss_p)
    x = tl.load(x_ptr + b * sx_b + h * sx_h + ps, mask=pmask, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + b * sb_b + g * sb_g + ns, mask=nmask, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + b * sc_b + g * sc_g + ns, mask=nmask, other=0.0).to(tl.float32)
    _ssu_store(state, sptr, smask, dt, decay, x, bv, cv, d_ptr, h, y_ptr + b * sy_b + h * sy_h + ps, pmask,
               _key_of(seed, lens_ptr, b, SR), _state_index(h, ps, ns, P, N), SR)


@triton.jit
def _state_index(h, ps, ns, P, N):
    """Flat index of the [P-tile, N] elements of head h in a slot's [H, P, N] state."""
    return (h * P + ps)[:, None] * N + ns[None, :]


@triton.jit(do_not_specialize=["seed"])
def _ssd_varlen_kernel(
    x_ptr, dt_ptr, alog_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, cu_ptr, lens_ptr, state_ptr, slots_ptr, init_ptr, y_ptr,
    seed, P, N, HEADS_PER_GROUP,
    sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_s, ss_h, ss_p, sy_t, sy_h,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    SR: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    ti = tl.arange(0, BLOCK_T)
    pmask = ps < P
    nmask = ns < N
    g = h // HEADS_PER_GROUP
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    has_init = tl.load(init_ptr + seq) != 0
    a_h = _A(alog_ptr, h)
    d_h = tl.load(d_ptr + h).to(tl.float32)
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    sptr = state_ptr + slot * ss_s + h * ss_h + ps[:, None] * ss_p + ns[None, :]
    smask = pmask[:, None] & nmask[None, :]
    state = tl.load(sptr, mask=smask & has_init, other=0.0).to(tl.float32)  # [BP, BN]
    causal = ti[:, None] >= ti[None, :]
    for c0 in range(start, end, BLOCK_T):
        ts = c0 + ti
        tmask = ts < end
        rows = ts.to(tl.int64)
        dt = _softplus(tl.load(dt_ptr + rows * sdt_t + h, mask=tmask, other=0.0).to(tl.float32) + dtb)
        dt = tl.where(tmask, dt, 0.0)
        ac = tl.cumsum(dt * a_h, axis=0)  # [BT] log-decay from the chunk start, non-increasing
        total = tl.sum(dt * a_h, axis=0)
        x = tl.load(x_ptr + rows[:, None] * sx_t + h * sx_h + ps[None, :],
                    mask=tmask[:, None] & pmask[None, :], other=0.0)  # [BT, BP]
        bm = tl.load(b_ptr + rows[:, None] * sb_t + g * sb_g + ns[None, :],
                     mask=tmask[:, None] & nmask[None, :], other=0.0)  # [BT, BN]
        cm = tl.load(c_ptr + rows[:, None] * sc_t + g * sc_g + ns[None, :],
                     mask=tmask[:, None] & nmask[None, :], other=0.0)  # [BT, BN]
        xf = x.to(tl.float32)
        # intra-chunk: y_i += sum_j (C_i . B_j) exp(ac_i - ac_j) dt_j x_j, j <= i
        scores = tl.dot(cm, tl.trans(bm), input_precision=DOT_PREC)  # [BT, BT]
        decay = tl.where(causal, tl.exp(ac[:, None] - ac[None, :]), 0.0)
        y = tl.dot(scores * decay, xf * dt[:, None], input_precision=DOT_PREC)  # [BT, BP]
        # carried state: y_i += exp(ac_i) C_i . state
        y += tl.dot(cm.to(tl.float32), tl.trans(state), input_precision=DOT_PREC) * tl.exp(ac)[:, None]
        y += d_h * xf
        tl.store(y_ptr + rows[:, None] * sy_t + h * sy_h + ps[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=tmask[:, None] & pmask[None, :])
        # carry: state = exp(total) state + sum_j exp(total - ac_j) dt_j outer(x_j, B_j)
        wx = xf * (tl.exp(total - ac) * dt)[:, None]  # [BT, BP]
        state = state * tl.exp(total) + tl.dot(tl.trans(wx), bm.to(tl.float32), input_precision=DOT_PREC)
    _store_state(sptr, smask, state, _key_of(seed, lens_ptr, seq, SR), _state_index(h, ps, ns, P, N), SR)


# prefill scan launch shape (bench/ops.py sweeps these); 32 x 32 tiles keep the 4 warps spill-free
SSD_TUNE = dict(BLOCK_T=32, BLOCK_P=32, num_warps=4, num_stages=2)


def _check(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, ssm_state, state_seed):
    t, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    assert dt_raw.shape == (t, h) and B.shape == (t, g, n) and C.shape == (t, g, n)
    assert A_log.shape == D.shape == dt_bias.shape == (h,) and h % g == 0
    assert ssm_state.dim() == 4 and ssm_state.shape[1:] == (h, p, n) and ssm_state.stride(-1) == 1
    for m in (x, B, C):
        assert m.stride(-1) == 1, "innermost dims must be contiguous"
    assert dt_raw.stride(-1) == 1 and seq_lens.dim() == 1
    return t, h, p, g, n, use_stochastic_rounding(ssm_state.dtype, state_seed)


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
    state, or None (round to nearest). Returns y [T, H, P] in x's dtype.
    """
    t, h, p, g, n, sr = _check(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, ssm_state, state_seed)
    nseq = state_slots.shape[0]
    assert cu_seqlens.shape == (nseq + 1,) and seq_lens.shape == (nseq,) and has_initial_state.shape == (nseq,)
    y = torch.empty((t, h, p), dtype=x.dtype, device=x.device)
    if nseq == 0:
        return y
    block_p = min(SSD_TUNE["BLOCK_P"], max(16, triton.next_power_of_2(p)))
    block_n = max(16, triton.next_power_of_2(n))
    # fp32 activations (tests, the tiny model) get exact fp32 dots; 16-bit ones tensor-core tf32
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _ssd_varlen_kernel[(nseq, h, triton.cdiv(p, block_p))](
        x, dt_raw, A_log, B, C, D, dt_bias, cu_seqlens.to(torch.int32), seq_lens.to(torch.int32), ssm_state,
        state_slots, has_initial_state.to(torch.int8), y,
        state_seed or 0, p, n, h // g,
        x.stride(0), x.stride(1), dt_raw.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
        BLOCK_T=SSD_TUNE["BLOCK_T"], BLOCK_P=block_p, BLOCK_N=block_n, DOT_PREC=prec, SR=sr,
        num_warps=SSD_TUNE["num_warps"], num_stages=SSD_TUNE["num_stages"],
    )
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
    nb, h, p, g, n, sr = _check(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, ssm_state, state_seed)
    assert state_slots.shape == (nb,) and seq_lens.shape == (nb,)
    y = torch.empty((nb, h, p), dtype=x.dtype, device=x.device)
    if nb == 0:
        return y
    block_n = triton.next_power_of_2(n)
    block_p = min(triton.next_power_of_2(p), max(1, 4096 // block_n))  # ~4k state elements a program
    _ssu_kernel[(nb, h, triton.cdiv(p, block_p))](
        x, dt_raw, A_log, B, C, D, dt_bias, seq_lens.to(torch.int32), ssm_state, state_slots, y, state_seed or 0,
        p, n, h // g,
        x.stride(0), x.stride(1), dt_raw.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
        BLOCK_P=block_p, BLOCK_N=block_n, SR=sr, num_warps=4,
    )
    return y
