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

from hybridserve.ops.triton.batch_meta import per_batch
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


@triton.jit
def _scan_block(state, x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, t0, end, h, g, ps, ns, pmask, nmask, a_h, d_h, dtb,
                sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, sy_t, sy_h, BLOCK_T: tl.constexpr, DOT_PREC: tl.constexpr):
    """Tokens t0 .. t0+BLOCK_T-1 (< end) of one head's P-tile with the [P-tile, N] state in registers:
    writes their y and returns the state after them."""
    ti = tl.arange(0, BLOCK_T)
    ts = t0 + ti
    tmask = ts < end
    rows = ts.to(tl.int64)
    dt = _softplus(tl.load(dt_ptr + rows * sdt_t + h, mask=tmask, other=0.0).to(tl.float32) + dtb)
    dt = tl.where(tmask, dt, 0.0)
    ac = tl.cumsum(dt * a_h, axis=0)  # [BT] log-decay from the block start, non-increasing
    total = tl.sum(dt * a_h, axis=0)
    x = tl.load(x_ptr + rows[:, None] * sx_t + h * sx_h + ps[None, :],
                mask=tmask[:, None] & pmask[None, :], other=0.0)  # [BT, BP]
    bm = tl.load(b_ptr + rows[:, None] * sb_t + g * sb_g + ns[None, :],
                 mask=tmask[:, None] & nmask[None, :], other=0.0)  # [BT, BN]
    cm = tl.load(c_ptr + rows[:, None] * sc_t + g * sc_g + ns[None, :],
                 mask=tmask[:, None] & nmask[None, :], other=0.0)  # [BT, BN]
    xf = x.to(tl.float32)
    # intra-block: y_i += sum_j (C_i . B_j) exp(ac_i - ac_j) dt_j x_j, j <= i
    scores = tl.dot(cm, tl.trans(bm), input_precision=DOT_PREC)  # [BT, BT]
    decay = tl.where(ti[:, None] >= ti[None, :], tl.exp(ac[:, None] - ac[None, :]), 0.0)
    y = tl.dot(scores * decay, xf * dt[:, None], input_precision=DOT_PREC)  # [BT, BP]
    # carried state: y_i += exp(ac_i) C_i . state
    y += tl.dot(cm.to(tl.float32), tl.trans(state), input_precision=DOT_PREC) * tl.exp(ac)[:, None]
    y += d_h * xf
    tl.store(y_ptr + rows[:, None] * sy_t + h * sy_h + ps[None, :], y.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & pmask[None, :])
    # carry: state = exp(total) state + sum_j exp(total - ac_j) dt_j outer(x_j, B_j)
    wx = xf * (tl.exp(total - ac) * dt)[:, None]  # [BT, BP]
    return state * tl.exp(total) + tl.dot(tl.trans(wx), bm.to(tl.float32), input_precision=DOT_PREC)


@triton.jit
def _seq_state(alog_ptr, d_ptr, dtb_ptr, state_ptr, slots_ptr, init_ptr, seq, h, ps, ns, pmask, nmask, ss_s, ss_h,
               ss_p):
    """A prefill program's head constants (A, D, dt_bias) and its [P-tile, N] start state as float32
    (zeros for a first chunk), with the state's pointers and mask."""
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    a_h = _A(alog_ptr, h)
    d_h = tl.load(d_ptr + h).to(tl.float32)
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    sptr = state_ptr + slot * ss_s + h * ss_h + ps[:, None] * ss_p + ns[None, :]
    smask = pmask[:, None] & nmask[None, :]
    state = tl.load(sptr, mask=smask & (tl.load(init_ptr + seq) != 0), other=0.0).to(tl.float32)
    return a_h, d_h, dtb, sptr, smask, state


@triton.jit(do_not_specialize=["seed"])
def _ssd_one_pass_kernel(
    x_ptr, dt_ptr, alog_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, cu_ptr, lens_ptr, state_ptr, slots_ptr, init_ptr, y_ptr,
    seed, P, N, HEADS_PER_GROUP,
    sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_s, ss_h, ss_p, sy_t, sy_h,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    SR: tl.constexpr,
):
    """The whole sequence in one program per (sequence, head, P-tile), block after block."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pmask = ps < P
    nmask = ns < N
    g = h // HEADS_PER_GROUP
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    a_h, d_h, dtb, sptr, smask, state = _seq_state(alog_ptr, d_ptr, dtb_ptr, state_ptr, slots_ptr, init_ptr, seq, h,
                                                   ps, ns, pmask, nmask, ss_s, ss_h, ss_p)
    for t0 in range(start, end, BLOCK_T):
        state = _scan_block(state, x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, t0, end, h, g, ps, ns, pmask, nmask, a_h, d_h,
                            dtb, sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, sy_t, sy_h, BLOCK_T, DOT_PREC)
    _store_state(sptr, smask & (end > start), state, _key_of(seed, lens_ptr, seq, SR), _state_index(h, ps, ns, P, N),
                 SR)  # a sequence without tokens (CUDA-graph padding) writes nothing


@triton.jit(do_not_specialize=["seed"])
def _ssd_state_pass_kernel(
    x_ptr, dt_ptr, alog_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, cu_ptr, lens_ptr, state_ptr, slots_ptr, init_ptr, y_ptr,
    first_ptr, prev_ptr, dtc_ptr, acum_ptr,
    seed, P, N, HEADS_PER_GROUP, H,
    sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_s, ss_h, ss_p, sy_t, sy_h,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, SR: tl.constexpr,
):
    """One program per (sequence, head, P-tile) carries the state along the sequence. The first chunk
    is scanned here in blocks (y included: its start state is the slot's, which this program
    overwrites at the end); for each later chunk it stores the start state, dt and the cumulative
    log-decay for `_ssd_chunk_scan_kernel` and advances the state a BLOCK_T block at a time."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pmask = ps < P
    nmask = ns < N
    g = h // HEADS_PER_GROUP
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    a_h, d_h, dtb, sptr, smask, state = _seq_state(alog_ptr, d_ptr, dtb_ptr, state_ptr, slots_ptr, init_ptr, seq, h,
                                                   ps, ns, pmask, nmask, ss_s, ss_h, ss_p)
    for t0 in range(start, tl.minimum(start + CHUNK, end), BLOCK_T):  # the first chunk, y included
        state = _scan_block(state, x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, t0, end, h, g, ps, ns, pmask, nmask, a_h, d_h,
                            dtb, sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, sy_t, sy_h, BLOCK_T, DOT_PREC)
    r = tl.load(first_ptr + seq)  # index of the sequence's second chunk among all later chunks
    head_row = tl.program_id(2) == 0  # one program per head writes the per-token rows
    ti = tl.arange(0, BLOCK_T)
    for c0 in range(start + CHUNK, end, CHUNK):
        tl.store(prev_ptr + (r * H + h).to(tl.int64) * P * N + ps[:, None] * N + ns[None, :],
                 state.to(prev_ptr.dtype.element_ty), mask=smask)
        crow = (r * H + h).to(tl.int64) * CHUNK
        off = 0.0  # log-decay from the chunk start to the block start
        for t0 in range(c0, tl.minimum(c0 + CHUNK, end), BLOCK_T):
            ts = t0 + ti
            tmask = ts < end
            rows = ts.to(tl.int64)
            dt = _softplus(tl.load(dt_ptr + rows * sdt_t + h, mask=tmask, other=0.0).to(tl.float32) + dtb)
            dt = tl.where(tmask, dt, 0.0)
            ac = tl.cumsum(dt * a_h, axis=0)
            total = tl.sum(dt * a_h, axis=0)
            tl.store(dtc_ptr + crow + (t0 - c0) + ti, dt, mask=head_row)
            tl.store(acum_ptr + crow + (t0 - c0) + ti, off + ac, mask=head_row)
            x = tl.load(x_ptr + rows[:, None] * sx_t + h * sx_h + ps[None, :],
                        mask=tmask[:, None] & pmask[None, :], other=0.0)  # [BT, BP]
            bm = tl.load(b_ptr + rows[:, None] * sb_t + g * sb_g + ns[None, :],
                         mask=tmask[:, None] & nmask[None, :], other=0.0)  # [BT, BN]
            # float32 operands (tf32 on 16-bit activations): the carried state keeps the one-pass accuracy
            wx = x.to(tl.float32) * (tl.exp(total - ac) * dt)[:, None]
            state = state * tl.exp(total) + tl.dot(tl.trans(wx), bm.to(tl.float32), input_precision=DOT_PREC)
            off += total
        r += 1
    _store_state(sptr, smask & (end > start), state, _key_of(seed, lens_ptr, seq, SR), _state_index(h, ps, ns, P, N),
                 SR)  # a sequence without tokens (CUDA-graph padding) writes nothing


@triton.jit
def _ssd_chunk_scan_kernel(
    x_ptr, b_ptr, c_ptr, d_ptr, cu_ptr, chunk_seq_ptr, first_ptr, prev_ptr, dtc_ptr, acum_ptr, y_ptr,
    NSEQ, P, N, HEADS_PER_GROUP, H,
    sx_t, sx_h, sb_t, sb_g, sc_t, sc_g, sy_t, sy_h,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """y of BLOCK_M tokens of a later chunk r (a sequence's second chunk or beyond), one head, all of P:
    exp(ac_i) C_i . start_state + sum_{j <= i} (C_i . B_j) exp(ac_i - ac_j) dt_j x_j + D x_i."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    seq = tl.load(chunk_seq_ptr + r)
    if seq < NSEQ:
        start = tl.load(cu_ptr + seq)
        t0 = start + (r - tl.load(first_ptr + seq) + 1) * CHUNK
        n_c = tl.minimum(tl.load(cu_ptr + seq + 1) - t0, CHUNK)
        if m0 < n_c:
            g = h // HEADS_PER_GROUP
            ps = tl.arange(0, BLOCK_P)
            ns = tl.arange(0, BLOCK_N)
            pmask = ps < P
            nmask = ns < N
            ms = m0 + tl.arange(0, BLOCK_M)
            mmask = ms < n_c
            rows_m = (t0 + ms).to(tl.int64)
            crow = (r * H + h).to(tl.int64) * CHUNK
            ac_m = tl.load(acum_ptr + crow + ms, mask=mmask, other=0.0)
            cm = tl.load(c_ptr + rows_m[:, None] * sc_t + g * sc_g + ns[None, :],
                         mask=mmask[:, None] & nmask[None, :], other=0.0)  # [BM, BN]
            sp = tl.load(prev_ptr + (r * H + h).to(tl.int64) * P * N + ps[:, None] * N + ns[None, :],
                         mask=pmask[:, None] & nmask[None, :], other=0.0)  # [BP, BN]
            acc = tl.dot(cm, tl.trans(sp.to(cm.dtype)), input_precision=DOT_PREC) * tl.exp(ac_m)[:, None]
            for k0 in range(0, m0 + BLOCK_M, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < n_c
                rows_k = (t0 + ks).to(tl.int64)
                bk = tl.load(b_ptr + rows_k[:, None] * sb_t + g * sb_g + ns[None, :],
                             mask=kmask[:, None] & nmask[None, :], other=0.0)  # [BK, BN]
                xk = tl.load(x_ptr + rows_k[:, None] * sx_t + h * sx_h + ps[None, :],
                             mask=kmask[:, None] & pmask[None, :], other=0.0)  # [BK, BP]
                dt_k = tl.load(dtc_ptr + crow + ks, mask=kmask, other=0.0)
                ac_k = tl.load(acum_ptr + crow + ks, mask=kmask, other=0.0)
                cb = tl.dot(cm, tl.trans(bk), input_precision=DOT_PREC)  # [BM, BK]
                keep = (ms[:, None] >= ks[None, :]) & kmask[None, :]
                w = tl.where(keep, cb * tl.exp(tl.minimum(ac_m[:, None] - ac_k[None, :], 0.0)) * dt_k[None, :], 0.0)
                acc += tl.dot(w.to(xk.dtype), xk, input_precision=DOT_PREC)
            xm = tl.load(x_ptr + rows_m[:, None] * sx_t + h * sx_h + ps[None, :],
                         mask=mmask[:, None] & pmask[None, :], other=0.0)
            acc += tl.load(d_ptr + h).to(tl.float32) * xm.to(tl.float32)
            tl.store(y_ptr + rows_m[:, None] * sy_t + h * sy_h + ps[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=mmask[:, None] & pmask[None, :])


# prefill launch shapes (bench/ops.py sweeps these). The state pass scans a sequence's first chunk in
# BLOCK_T-token blocks with BLOCK_P-row state tiles (32 x 32 keeps its 4 warps spill-free), then
# steps by CHUNK tokens; the chunk scan covers BLOCK_M tokens of a chunk per program, BLOCK_K at a time.
SSD_TUNE = dict(CHUNK=128, BLOCK_T=32, BLOCK_P=32, num_warps=4, num_stages=2,
                SCAN_BLOCK_M=64, SCAN_BLOCK_K=64, scan_warps=4, scan_stages=2)


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
    state, or None (round to nearest). A sequence with no tokens leaves its slot alone. Returns
    y [T, H, P] in x's dtype.
    """
    return _ssd_prefill(x, dt_raw, A_log, B, C, D, dt_bias, cu_seqlens, seq_lens, ssm_state, state_slots,
                        has_initial_state, state_seed, chunked=True)


def ssd_varlen_one_pass(x, dt_raw, A_log, B, C, D, dt_bias, cu_seqlens, seq_lens, ssm_state, state_slots,
                        has_initial_state, chunk_size, state_seed=None):
    """`ssd_varlen` by the previous kernel (each sequence in one program per head and P-tile, block
    after block), kept for A/B runs of bench/ops.py and tested as a twin."""
    return _ssd_prefill(x, dt_raw, A_log, B, C, D, dt_bias, cu_seqlens, seq_lens, ssm_state, state_slots,
                        has_initial_state, state_seed, chunked=False)


def _ssd_prefill(x, dt_raw, A_log, B, C, D, dt_bias, cu_seqlens, seq_lens, ssm_state, state_slots, has_initial_state,
                 state_seed, chunked: bool):
    t, h, p, g, n, sr = _check(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, ssm_state, state_seed)
    nseq = state_slots.shape[0]
    assert cu_seqlens.shape == (nseq + 1,) and seq_lens.shape == (nseq,) and has_initial_state.shape == (nseq,)
    y = torch.empty((t, h, p), dtype=x.dtype, device=x.device)
    if nseq == 0:
        return y
    cfg = SSD_TUNE
    block_p = min(cfg["BLOCK_P"], max(16, triton.next_power_of_2(p)))
    block_n = max(16, triton.next_power_of_2(n))
    # fp32 activations (tests, the tiny model) get exact fp32 dots; 16-bit ones tensor cores
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    q = cfg["CHUNK"]
    cu, lens, init, first, chunk_seq, n_later = per_batch(
        "ssd", (cu_seqlens, seq_lens, has_initial_state),
        lambda: _later_chunks(cu_seqlens, seq_lens, has_initial_state, t, q))
    common = (x, dt_raw, A_log, B, C, D, dt_bias, cu, lens, ssm_state, state_slots, init, y)
    strides = (x.stride(0), x.stride(1), dt_raw.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
               ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1))
    grid = (nseq, h, triton.cdiv(p, block_p))
    launch = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_P=block_p, BLOCK_N=block_n, DOT_PREC=prec, SR=sr,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not chunked:
        _ssd_one_pass_kernel[grid](*common, state_seed or 0, p, n, h // g, *strides, **launch)
        return y
    # start states of later chunks: operands of the scan's dots, so in x's dtype
    prev = torch.empty((n_later, h, p, n), dtype=x.dtype, device=x.device)
    dtc = torch.empty((n_later, h, q), dtype=torch.float32, device=x.device)
    acum = torch.empty_like(dtc)
    _ssd_state_pass_kernel[grid](*common, first, prev, dtc, acum, state_seed or 0, p, n, h // g, h, *strides,
                                 CHUNK=q, **launch)
    _ssd_chunk_scan_kernel[(n_later, h, triton.cdiv(q, cfg["SCAN_BLOCK_M"]))](
        x, B, C, D, cu, chunk_seq, first, prev, dtc, acum, y, nseq, p, n, h // g, h,
        x.stride(0), x.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1),
        CHUNK=q, BLOCK_M=cfg["SCAN_BLOCK_M"], BLOCK_K=cfg["SCAN_BLOCK_K"], BLOCK_P=max(16, triton.next_power_of_2(p)),
        BLOCK_N=block_n, DOT_PREC=prec, num_warps=cfg["scan_warps"], num_stages=cfg["scan_stages"],
    )
    return y


def _later_chunks(cu_seqlens, seq_lens, has_initial_state, t: int, q: int):
    """int32 cu / lens, int8 flags, and the "later" chunks (a sequence's second chunk and beyond,
    numbered over the batch, at most T / CHUNK): each sequence's first one and each one's sequence
    (nseq past the last). The same for every layer of a step."""
    cu = cu_seqlens.to(torch.int32)
    later = (cu[1:] - cu[:-1] - 1).clamp_min(0) // q
    ends = torch.cumsum(later, 0, dtype=torch.int32)
    n_later = max(1, t // q)
    chunk_seq = torch.searchsorted(ends, torch.arange(n_later, device=cu.device, dtype=torch.int32), right=True,
                                   out_int32=True)
    return cu, seq_lens.to(torch.int32), has_initial_state.to(torch.int8), ends - later, chunk_seq, n_later


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
