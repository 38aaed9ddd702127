"""Causal attention without positional encoding over paged KV, for prefill chunks and decode.

GQA: query head i uses kv head i // (H / Hkv). The KV cache of one attention layer is
[2, NB, BS, Hkv, D]: a token at position p of a sequence lives at page block_table[p // BS],
offset p % BS. New tokens' K/V are stored first, then each sequence's queries attend to all its
tokens up to their own position (earlier steps' tokens included).

An FP8 cache (float8_e4m3fn) stores k / k_scale and v / v_scale (saturated at ±448) with one float32
scale per layer each (`kv_scale` = [k_scale, v_scale]); attention reads them back times the scale.

Triton: one kernel for prefill chunks and decode. A program owns (a tile of BLOCK_Q query tokens
of one sequence) x (one kv head) x (one split of the KV range); its BLOCK_Q * H/Hkv query rows
(every q head of the group) share each K/V tile, so K/V are read once per group, not once per
q head. FP8 pages are widened to q's dtype as they are loaded (exact); k_scale folds into the
softmax scale and v_scale into the output.

Decode splits the KV range (flash-decoding), chosen by shape: the host picks the number of splits
from the batch (enough programs for `target_programs`, at most `max_splits`); each sequence then
uses as many as its own context needs, at least `min_split_tokens` per split, so a short context
runs one program while a long one at batch 1 spreads over up to max_splits. A second small kernel
merges each row's active splits by their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.batch_meta import per_batch
from hybridserve.ops.triton.fp8 import FP8_DTYPE, _quantize_tile


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, scale_ptr, W, stride_k, stride_v, stride_kv,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    cols = tl.arange(0, BLOCK)
    mask = cols < W
    dst = cache_ptr + slot * W + cols
    k = tl.load(k_ptr + t * stride_k + cols, mask=mask)
    v = tl.load(v_ptr + t * stride_v + cols, mask=mask)
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        k = _quantize_tile(k, tl.load(scale_ptr))
        v = _quantize_tile(v, tl.load(scale_ptr + 1))
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_range(kv_end, split, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """[lo, hi) of the keys [0, kv_end) that split `split` of SPLITS takes: equal BLOCK_N-aligned
    shares of at least MIN_SPLIT keys (so a short range uses fewer splits); lo >= hi: none."""
    per_split = tl.maximum(tl.cdiv(tl.cdiv(kv_end, SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    lo = split * per_split
    return lo, tl.minimum(kv_end, lo + per_split), tl.cdiv(kv_end, per_split)


@triton.jit(do_not_specialize=["T"])  # varies per step: no recompile per value
def _attn_kernel(
    q_ptr, cache_ptr, tables_ptr, cu_ptr, lens_ptr, tile_seq_ptr, tile_q0_ptr, o_ptr, part_ptr, ml_ptr, kv_scale_ptr,
    scale_log2, H, D, BS, T,
    stride_qt, stride_qh, stride_kv, stride_kb, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, DECODE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one token per sequence: tile b is sequence b, no mapping needed
        seq = tile
        q0 = 0
    else:
        seq = tl.load(tile_seq_ptr + tile)
        if seq < 0:  # grid is sized for the worst case
            return
        q0 = tl.load(tile_q0_ptr + tile)  # first query (index within the sequence's new tokens)
    start = tl.load(cu_ptr + seq)
    new = tl.load(cu_ptr + seq + 1) - start
    total = tl.load(lens_ptr + seq)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // GROUP_PAD
    head = kvh * GROUP + r % GROUP_PAD
    rmask = (qi < new) & (r % GROUP_PAD < GROUP)
    qpos = total - new + qi  # absolute position of each row's query
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    tok = (start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + ds[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    # keys this tile may see: [0, kv_end); this split takes its share (none: nothing to store)
    kv_end = tl.minimum(total, total - new + q0 + BLOCK_Q)
    lo, hi, _ = _split_range(kv_end, split, SPLITS, BLOCK_N, MIN_SPLIT)
    if SPLITS > 1 and lo >= hi:
        return
    if cache_ptr.dtype.element_ty == tl.float8e4nv:  # k_scale folds into the softmax scale, v_scale into the output
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)
    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kbase = cache_ptr + kvh * stride_kh
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    ns = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + ns
        pmask = pos < hi
        page = tl.load(table + pos // BS, mask=pmask, other=0).to(tl.int64)
        off = page * stride_kb + (pos % BS) * stride_ks
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(kbase + off[:, None] + ds[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kbase + stride_kv + off[:, None] + ds[None, :], mask=kv_mask, other=0.0)
        if cache_ptr.dtype.element_ty == tl.float8e4nv:  # e4m3 values are exact in every float type
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s = tl.where((pos[None, :] <= qpos[:, None]) & pmask[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    omask = rmask[:, None] & dmask[None, :]
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        acc = acc * tl.load(kv_scale_ptr + 1)
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + ds[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=omask)
    else:
        # partials [SPLITS, T, H, D] float32 (unnormalised) and (m, l) [SPLITS, T, H, 2]
        prow = (split * T + tok) * H + head
        tl.store(part_ptr + prow[:, None] * D + ds[None, :], acc, mask=omask)
        tl.store(ml_ptr + prow * 2, m_i, mask=rmask)
        tl.store(ml_ptr + prow * 2 + 1, l_i, mask=rmask)


@triton.jit(do_not_specialize=["T"])  # varies per step: no recompile per value
def _merge_kernel(part_ptr, ml_ptr, lens_ptr, o_ptr, T, H, D, stride_ot, stride_oh,
                  SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Decode row t (sequence t), head h: the active splits' partials weighted by exp2(m - max m)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    _, _, active = _split_range(tl.load(lens_ptr + t), 0, SPLITS, BLOCK_N, MIN_SPLIT)
    ss = tl.arange(0, SPLITS)
    ds = tl.arange(0, BLOCK_D)
    smask = ss < active
    prow = (ss * T + t) * H + h
    m = tl.load(ml_ptr + prow * 2, mask=smask, other=-float("inf"))
    m_max = tl.max(m, axis=0)
    wgt = tl.where(m == -float("inf"), 0.0, tl.exp2(m - m_max))
    denom = tl.sum(wgt * tl.load(ml_ptr + prow * 2 + 1, mask=smask, other=0.0), axis=0)
    out = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, active):
        w_i = tl.sum(tl.where(ss == i, wgt, 0.0), axis=0)
        out += w_i * tl.load(part_ptr + ((i * T + t) * H + h) * D + ds, mask=ds < D, other=0.0)
    out = out / tl.where(denom == 0.0, 1.0, denom)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + ds, out.to(o_ptr.dtype.element_ty), mask=ds < D)


# decode launch shape (bench/ops.py sweeps these): KV tile rows, pipeline depth, warps, the number
# of programs the KV splits aim for (two waves of the H100's 132 SMs), at most this many splits, at
# least this many keys per split
DECODE_TUNE = dict(BLOCK_N=64, num_stages=2, num_warps=4, target_programs=264, max_splits=64, min_split_tokens=256)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D]; kv_cache: [2, NB, BS, Hkv, D] updated in place; slot_mapping: [T] int64
    flat slots (page * BS + offset); negative slots are skipped (padding). kv_scale: [2] float32
    (k, v) scales of a float8_e4m3fn cache (required then, else None)."""
    assert (kv_scale is not None) == (kv_cache.dtype == FP8_DTYPE), "kv_scale goes with an fp8 cache"
    t, hkv, d = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (t,)
    assert kv_cache.dim() == 5 and kv_cache.shape[3:] == (hkv, d) and kv_cache[0].is_contiguous()
    assert k.stride(2) == 1 and k.stride(1) == d and v.stride(2) == 1 and v.stride(1) == d
    if t == 0:
        return
    w = hkv * d
    _store_kv_kernel[(t,)](
        k, v, kv_cache, slot_mapping, kv_scale if kv_scale is not None else k, w, k.stride(0), v.stride(0),
        kv_cache.stride(0),
        BLOCK=triton.next_power_of_2(w), num_warps=1 if w <= 256 else 4,
    )


def _query_tiles(cu_seqlens: torch.Tensor, block_q: int, max_tiles: int):
    """int32 cu and the query tiles' sequences (-1 past the last) and first rows: sum_b cdiv(new_b,
    block_q) <= cdiv(T, block_q) + B tiles, mapped on the device (the same for every layer of a step)."""
    cu = cu_seqlens.to(torch.int32)
    nseq = cu.shape[0] - 1
    tile_end = ((cu[1:] - cu[:-1] + block_q - 1) // block_q).cumsum(0)
    tile_ids = torch.arange(max_tiles, device=cu.device)
    tile_seq = torch.searchsorted(tile_end, tile_ids, right=True)
    first_tile = torch.cat([tile_end.new_zeros(1), tile_end])[tile_seq.clamp(max=nseq - 1)]
    tile_q0 = ((tile_ids - first_tile) * block_q).to(torch.int32)
    return cu, torch.where(tile_seq < nseq, tile_seq, -1).to(torch.int32), tile_q0


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, H, D] the new tokens' queries; kv_cache: [2, NB, BS, Hkv, D] (already holding the new
    tokens); block_tables: [B, M] int32; cu_seqlens: [B+1] int32 (new tokens per sequence);
    seq_lens: [B] int32 (cached + new); kv_scale: [2] float32 (k, v) scales of a float8_e4m3fn
    cache (required then, else None). Returns [T, H, D] in q's dtype (softmax in float32)."""
    assert (kv_scale is not None) == (kv_cache.dtype == FP8_DTYPE), "kv_scale goes with an fp8 cache"
    t, h, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    nseq = seq_lens.shape[0]
    assert kv_cache.shape[0] == 2 and kv_cache.shape[4] == d and h % hkv == 0 and q.stride(2) == 1
    assert kv_cache.stride(4) == 1 and block_tables.dim() == 2 and block_tables.shape[0] == nseq
    assert cu_seqlens.shape == (nseq + 1,) and block_tables.stride(1) == 1
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0 or nseq == 0:
        return out
    group = h // hkv
    group_pad = triton.next_power_of_2(group)
    decode = t == nseq  # every sequence brings one token (ForwardBatch guarantees at least one each)
    block_q = 1 if decode else max(1, 128 // group_pad)
    block_q = max(block_q, triton.cdiv(16, group_pad))  # tl.dot needs >= 16 rows
    if decode:
        cu = cu_seqlens.to(torch.int32)
        max_tiles, tile_seq, tile_q0 = nseq, cu, cu  # unused
    else:
        max_tiles = triton.cdiv(t, block_q) + nseq
        cu, tile_seq, tile_q0 = per_batch(f"attention q{block_q}", (cu_seqlens,),
                                          lambda: _query_tiles(cu_seqlens, block_q, max_tiles))
    # split the KV range when the grid would not fill the GPU (decode, short batches)
    programs = max_tiles * hkv
    tune = DECODE_TUNE
    splits = 1 if not decode else min(tune["max_splits"],
                                      max(1, triton.next_power_of_2(triton.cdiv(tune["target_programs"], programs))))
    block_d = triton.next_power_of_2(d)
    block_n = (tune["BLOCK_N"] if decode else 64) if block_d <= 128 else 32
    min_split = max(block_n, tune["min_split_tokens"] // block_n * block_n)
    if splits > 1:
        part = torch.empty((splits, t, h, d), dtype=torch.float32, device=q.device)
        ml = torch.empty((splits, t, h, 2), dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    _attn_kernel[(max_tiles, hkv, splits)](
        q, kv_cache, block_tables, cu, seq_lens, tile_seq, tile_q0, out, part, ml,
        kv_scale if kv_scale is not None else q,
        scale * 1.4426950408889634, h, d, bs, t,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=splits,
        MIN_SPLIT=min_split, DECODE=decode,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tune["num_warps"] if decode else 8 if block_q * group_pad > 64 else 4,
        num_stages=tune["num_stages"] if decode else 2,
    )
    if splits > 1:
        _merge_kernel[(t, h)](part, ml, seq_lens, out, t, h, d, out.stride(0), out.stride(1),
                              SPLITS=splits, BLOCK_N=block_n, MIN_SPLIT=min_split, BLOCK_D=block_d, num_warps=1)
    return out
