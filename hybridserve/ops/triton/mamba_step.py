"""One decode token of a Mamba-2 mixer after its in_proj: conv update, SiLU, then the SSM state
update, reading and writing both state slots in place (see conv.py for the conv ring, ssd.py for
the state update). One op so that a GPU runs it as one kernel: alone, the conv update moves a few
MB per layer and costs mostly its launch.

Triton: one program per (sequence, head, tile of P rows), as `selective_state_update`. It convolves
its own x channels and its group's B and C channels (every program of a group recomputes those 2N
channels from L2), writes the new raw x rows into the conv ring, and only the group's first
program writes the B/C rows. The ring makes this safe: the row written (position p) is one no
program of the step reads (p-K+1 .. p-1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.conv import _conv_channels, _ring_row
from hybridserve.ops.triton.rounding import use_stochastic_rounding
from hybridserve.ops.triton.ssd import _key_of, _ssu_load, _ssu_store, _state_index

# state elements per program (a [BLOCK_P, N] tile) and warps. H100 (bench/ops.py --sweep, 2026-11-27):
# 2048 or 8192 elements, 8 warps, and the ring read as one [channels, K] tile were all slower
STEP_TUNE = dict(state_elems=4096, num_warps=4)


@triton.jit(do_not_specialize=["seed"])
def _mamba_step_kernel(
    xbc_ptr, dt_ptr, w_ptr, cb_ptr, alog_ptr, d_ptr, dtb_ptr, lens_ptr, conv_ptr, state_ptr, slots_ptr, y_ptr, seed,
    P, N, HEADS_PER_GROUP, X_CH, G,
    sxbc_b, sdt_b, scv_s, scv_k, ss_s, ss_h, ss_p, sy_b, sy_h,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pmask = ps < P
    nmask = ns < N
    g = h // HEADS_PER_GROUP
    slot = tl.load(slots_ptr + b).to(tl.int64)
    pos = tl.load(lens_ptr + b) - 1
    sptr, smask, state, dt, decay = _ssu_load(state_ptr, slot, dt_ptr, dtb_ptr, alog_ptr, b, h, ps, ns, pmask,
                                              nmask, sdt_b, ss_s, ss_h, ss_p)

    xbc_row = xbc_ptr + b * sxbc_b
    ring = conv_ptr + slot * scv_s
    new_row = ring + _ring_row(pos, KW) * scv_k
    x_ch = h * P + ps
    b_ch = X_CH + g * N + ns
    c_ch = X_CH + (G + g) * N + ns
    x_raw, x = _conv_channels(xbc_row, w_ptr, cb_ptr, ring, scv_k, x_ch, pmask, pos, KW, HAS_BIAS)
    b_raw, bv = _conv_channels(xbc_row, w_ptr, cb_ptr, ring, scv_k, b_ch, nmask, pos, KW, HAS_BIAS)
    c_raw, cv = _conv_channels(xbc_row, w_ptr, cb_ptr, ring, scv_k, c_ch, nmask, pos, KW, HAS_BIAS)
    tl.store(new_row + x_ch, x_raw.to(conv_ptr.dtype.element_ty), mask=pmask)
    group_writer = (h % HEADS_PER_GROUP == 0) & (tl.program_id(2) == 0)
    tl.store(new_row + b_ch, b_raw.to(conv_ptr.dtype.element_ty), mask=nmask & group_writer)
    tl.store(new_row + c_ch, c_raw.to(conv_ptr.dtype.element_ty), mask=nmask & group_writer)

    _ssu_store(state, sptr, smask, dt, decay, x, bv, cv, d_ptr, h, y_ptr + b * sy_b + h * sy_h + ps, pmask,
               _key_of(seed, lens_ptr, b, SR), _state_index(h, ps, ns, P, N), SR)


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
    c, kw = conv_weight.shape
    g = (c - h * p) // (2 * n)
    assert xbc.shape == (nb, c) and xbc.stride(-1) == 1 and dt_raw.stride(-1) == 1 and conv_weight.is_contiguous()
    assert c == h * p + 2 * g * n and h % g == 0, "xbc must hold H*P x channels and G*N B and C channels"
    assert conv_state.shape[1:] == (kw, c) and conv_state.stride(-1) == 1
    assert ssm_state.shape[1] == h and ssm_state.stride(-1) == 1
    assert seq_lens.shape == (nb,) and state_slots.shape == (nb,)
    sr = use_stochastic_rounding(ssm_state.dtype, state_seed)
    y = torch.empty((nb, h, p), dtype=xbc.dtype, device=xbc.device)
    if nb == 0:
        return y
    block_n = triton.next_power_of_2(n)
    block_p = min(triton.next_power_of_2(p), max(1, STEP_TUNE["state_elems"] // block_n))
    _mamba_step_kernel[(nb, h, triton.cdiv(p, block_p))](
        xbc, dt_raw, conv_weight, conv_bias, A_log, D, dt_bias, seq_lens.to(torch.int32), conv_state, ssm_state,
        state_slots, y, state_seed or 0,
        p, n, h // g, h * p, g,
        xbc.stride(0), dt_raw.stride(0), conv_state.stride(0), conv_state.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
        KW=kw, HAS_BIAS=conv_bias is not None, BLOCK_P=block_p, BLOCK_N=block_n, SR=sr,
        num_warps=STEP_TUNE["num_warps"],
    )
    return y
