"""Depthwise causal conv1d + SiLU of the Mamba-2 mixer, over packed ragged sequences.

The conv state of a sequence is a ring of its last K *raw* (pre-conv) input rows, kept in a slot
of `conv_state [S, K, C]`: the row at position q lives in ring row q % K (rows of positions < 0 are
zero). A decode step at position p reads the rows of p-K+1..p-1 and writes only row p % K, a row
no reader of the same step needs, so a fused decode kernel can update the state of channels that
many programs read (the B/C channels shared by a group of heads) without ordering its programs.
Sequences without initial state start from zeros. Positions come from `seq_lens` (tokens of each
sequence after this step), as for attention.

Triton: the prefill conv is a grid over (token tile, channel tile); each token finds its sequence
through a [T] index, so one long prompt fills the GPU as well as many short ones. The ring rows the
sequences end with are written by a second launch, after every read of the old rows. The decode
update reads K-1 ring rows and x and writes one ring row and the output (memory-bound; the model's
decode step uses the fused `mamba_decode_step` instead, which spares this launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.batch_meta import per_batch


@triton.jit
def _ring_row(pos, KW: tl.constexpr):
    """Ring row of a position (which may be negative: rows before a sequence's start)."""
    return (pos % KW + KW) % KW


@triton.jit(do_not_specialize=["T"])  # varies per step: no recompile per value
def _conv_varlen_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, state_ptr, seq_idx_ptr, cu_ptr, lens_ptr, slots_ptr, init_ptr,
    T, C, stride_x, stride_out, stride_ss, stride_sk,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tmask = ts < T
    cmask = cs < C
    seq = tl.load(seq_idx_ptr + ts, mask=tmask, other=0)
    start = tl.load(cu_ptr + seq, mask=tmask, other=0)
    # position of row `start` in its sequence
    pos0 = tl.load(lens_ptr + seq, mask=tmask, other=0) - (tl.load(cu_ptr + seq + 1, mask=tmask, other=0) - start)
    slot = tl.load(slots_ptr + seq, mask=tmask, other=0).to(tl.int64)
    has_init = tl.load(init_ptr + seq, mask=tmask, other=0) != 0
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(KW):
        src = ts - (KW - 1) + k  # source row of this tap; < start means "from the ring"
        in_seq = src >= start
        xv = tl.load(
            x_ptr + src.to(tl.int64)[:, None] * stride_x + cs[None, :],
            mask=(tmask & in_seq)[:, None] & cmask[None, :], other=0.0,
        )
        srow = _ring_row(pos0 + src - start, KW)
        sv = tl.load(
            state_ptr + slot[:, None] * stride_ss + srow[:, None] * stride_sk + cs[None, :],
            mask=(tmask & ~in_seq & has_init)[:, None] & cmask[None, :], other=0.0,
        )
        xv = tl.where(in_seq[:, None], xv, sv.to(xv.dtype))
        wk = tl.load(w_ptr + cs * KW + k, mask=cmask, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wk[None, :]
    y = acc * tl.sigmoid(acc)
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * stride_out + cs[None, :], y.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _conv_state_kernel(
    x_ptr, state_ptr, cu_ptr, lens_ptr, slots_ptr, init_ptr,
    C, stride_x, stride_ss, stride_sk,
    KW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Ring rows of positions end-K .. end-1: the sequence's rows; older ones stay (zero without
    initial state). Each ring row is written by one j, and only x is read: no ordering needed. A
    sequence without tokens (CUDA-graph padding) writes nothing."""
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    start = tl.load(cu_ptr + b)
    end_pos = tl.load(lens_ptr + b)
    pos0 = end_pos - (tl.load(cu_ptr + b + 1) - start)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    has_init = tl.load(init_ptr + b) != 0
    for j in tl.static_range(KW):
        q = end_pos - KW + j
        from_x = q >= pos0
        xv = tl.load(x_ptr + (start + q - pos0).to(tl.int64) * stride_x + cs, mask=cmask & from_x, other=0.0)
        dst = state_ptr + slot * stride_ss + _ring_row(q, KW) * stride_sk + cs
        tl.store(dst, xv.to(state_ptr.dtype.element_ty), mask=cmask & (from_x | ~has_init) & (end_pos > pos0))


@triton.jit
def _conv_channels(xbc_row, w_ptr, cb_ptr, ring, stride_sk, chans, mask, pos, KW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One decode token's conv for the given channels: (raw x at pos, silu(conv) rounded to x's dtype,
    as float32). `ring` is the sequence's slot; reads the rows of positions pos-K+1 .. pos-1."""
    x = tl.load(xbc_row + chans, mask=mask, other=0.0)
    acc = tl.zeros(chans.shape, dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(cb_ptr + chans, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(KW - 1):
        old = tl.load(ring + _ring_row(pos + 1 + k, KW) * stride_sk + chans, mask=mask, other=0.0)
        acc += old.to(x.dtype).to(tl.float32) * tl.load(w_ptr + chans * KW + k, mask=mask, other=0.0).to(tl.float32)
    acc += x.to(tl.float32) * tl.load(w_ptr + chans * KW + KW - 1, mask=mask, other=0.0).to(tl.float32)
    y = acc * tl.sigmoid(acc)
    return x, y.to(x.dtype).to(tl.float32)


@triton.jit
def _conv_update_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, state_ptr, slots_ptr, lens_ptr,
    C, stride_x, stride_out, stride_ss, stride_sk,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    slot = tl.load(slots_ptr + b).to(tl.int64)
    pos = tl.load(lens_ptr + b) - 1
    ring = state_ptr + slot * stride_ss
    x, y = _conv_channels(x_ptr + b.to(tl.int64) * stride_x, w_ptr, b_ptr, ring, stride_sk, cs, cmask, pos, KW, HAS_BIAS)
    tl.store(ring + _ring_row(pos, KW) * stride_sk + cs, x.to(state_ptr.dtype.element_ty), mask=cmask)
    tl.store(out_ptr + b.to(tl.int64) * stride_out + cs, y.to(out_ptr.dtype.element_ty), mask=cmask)


def _check_state(x, weight, conv_state, state_slots):
    c, k = weight.shape
    assert x.dim() == 2 and x.shape[1] == c and x.stride(-1) == 1, "x must be [T, C] with contiguous rows"
    assert weight.is_contiguous()
    assert conv_state.dim() == 3 and conv_state.shape[1:] == (k, c) and conv_state.stride(-1) == 1
    assert state_slots.dim() == 1
    return c, k


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
    c, k = _check_state(x, weight, conv_state, state_slots)
    nseq = state_slots.shape[0]
    assert cu_seqlens.shape == (nseq + 1,) and seq_lens.shape == (nseq,) and has_initial_state.shape == (nseq,)
    t = x.shape[0]
    out = torch.empty((t, c), dtype=x.dtype, device=x.device)
    if nseq == 0:
        return out
    cu, lens, init, seq_idx = per_batch("conv", (cu_seqlens, seq_lens, has_initial_state),
                                        lambda: _conv_meta(cu_seqlens, seq_lens, has_initial_state, t))
    if t > 0:
        block_t, block_c = 16, 128
        _conv_varlen_kernel[(triton.cdiv(t, block_t), triton.cdiv(c, block_c))](
            x, weight, bias, out, conv_state, seq_idx, cu, lens, state_slots, init,
            t, c, x.stride(0), out.stride(0), conv_state.stride(0), conv_state.stride(1),
            KW=k, HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
        )
    block_c = 256
    _conv_state_kernel[(nseq, triton.cdiv(c, block_c))](
        x, conv_state, cu, lens, state_slots, init, c, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        KW=k, BLOCK_C=block_c, num_warps=2,
    )
    return out


def _conv_meta(cu_seqlens, seq_lens, has_initial_state, t: int):
    """int32 cu / lens, int8 flags and each token's sequence (the same for every layer of a step)."""
    cu = cu_seqlens.to(torch.int32)
    pos = torch.arange(t, device=cu.device, dtype=torch.int32)
    seq_idx = torch.searchsorted(cu[1:], pos, right=True, out_int32=True)
    return cu, seq_lens.to(torch.int32), has_initial_state.to(torch.int8), seq_idx


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
    c, k = _check_state(x, weight, conv_state, state_slots)
    nseq = x.shape[0]
    assert state_slots.shape == (nseq,) and seq_lens.shape == (nseq,)
    out = torch.empty((nseq, c), dtype=x.dtype, device=x.device)
    if nseq == 0:
        return out
    block_c = 512  # measured on H100: 1024 halves the bandwidth (fewer programs in flight)
    _conv_update_kernel[(nseq, triton.cdiv(c, block_c))](
        x, weight, bias, out, conv_state, state_slots, seq_lens.to(torch.int32),
        c, x.stride(0), out.stride(0), conv_state.stride(0), conv_state.stride(1),
        KW=k, HAS_BIAS=bias is not None, BLOCK_C=block_c, num_warps=4,
    )
    return out
