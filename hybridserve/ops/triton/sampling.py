"""Token sampling on the GPU: the fast twin of `hybridserve/ops/reference/sampling.py::sample_tokens`.

Same tokens as the reference for the same (seed, position): the counter-based noise is the same
32-bit hash in uint32 arithmetic (the per-row key too, in the kernel: no host-side chain of small ops), the Gumbel keys use correctly rounded division and log
(libdevice), and ties go to the lowest index as torch.argmax does.

One kernel per step streams each row once, split over (row, vocabulary chunk) programs so a single
row still fills the GPU: temperature, noise, Gumbel key and the chunk's argmax (greedy rows: argmax of
the raw logits) — no [R, V] noise, key or scatter tensors; a [R, chunks] argmax picks the winner
(the first chunk on ties, so the lowest index wins). Filtering keeps a *prefix* of the sorted
distribution (top-k, top-p and min-p all cut the descending order), so it reduces to one threshold
per row, the smallest kept value; ties at the threshold are all kept. A first kernel finds it
without sorting and without a host read: a radix select, one program per row, over the values'
order-preserving 32-bit keys, 4 bits per pass over the row — counting elements for top-k (the k-th
largest value) and summing their probabilities for top-p (the largest value whose upper tail holds
top_p of the top-k mass); min-p is max + log(min_p). At most 17 passes over the row (max, 8 for
top-k, 8 for top-p), each skipped when its filter is off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _mix32(x):
    """The reference's mix32 on uint32 (products wrap mod 2^32; the casts keep the low 32 bits
    whatever width the constant promotes to)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D).to(tl.uint32)
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, position):
    """The reference's per-row noise key from (seed, position), both int64."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _mix32(lo ^ _mix32(hi ^ 0x68E31DA4))
    return _mix32(key ^ _mix32((position & 0xFFFFFFFF).to(tl.uint32) ^ 0x1B873593))


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, seed_ptr, pos_ptr, thresh_ptr, best_ptr, idx_ptr, V, stride_l, n_chunks,
    HAS_THRESH: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + r)
    greedy = temp == 0.0
    t_div = tl.where(greedy, 1.0, temp)
    key = _row_key(tl.load(seed_ptr + r).to(tl.int64), tl.load(pos_ptr + r).to(tl.int64))
    if HAS_THRESH:
        lo = tl.load(thresh_ptr + r)
    best = tl.full((BLOCK,), -float("inf"), tl.float32)
    best_i = tl.full((BLOCK,), 2**31 - 1, tl.int32)
    for v0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        m = cols < V
        lg = tl.load(logits_ptr + r * stride_l + cols, mask=m, other=-float("inf"))
        if greedy:
            k = lg
        else:
            bits = _mix32(key ^ _mix32(cols.to(tl.uint32) ^ 0x27D4EB2F))
            u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            if PRECISE:  # correctly rounded division and CUDA's logf, as torch computes them
                s = libdevice.div_rn(lg, t_div)
                k = s - libdevice.log(-libdevice.log(u))
            else:  # Triton's interpreter has no libdevice
                s = lg / t_div
                k = s - tl.log(-tl.log(u))
            if HAS_THRESH:
                k = tl.where(s >= lo, k, -float("inf"))
        k = tl.where(m, k, -float("inf"))
        better = (k > best) | ((k == best) & (cols < best_i))  # keep the lowest index on ties
        best_i = tl.where(better, cols, best_i)
        best = tl.where(better, k, best)
    top = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == top, best_i, 2**31 - 1), axis=0)
    tl.store(best_ptr + r * n_chunks + chunk, top)
    tl.store(idx_ptr + r * n_chunks + chunk, idx.to(tl.int64))


@triton.jit
def _scaled(row, cols, m, t_div, PRECISE: tl.constexpr):
    """logits / temperature for the given columns (-inf outside the row), as the sampling kernel has them."""
    lg = tl.load(row + cols, mask=m, other=-float("inf"))
    if PRECISE:
        return libdevice.div_rn(lg, t_div)
    else:
        return lg / t_div


@triton.jit
def _order_key(s):
    """float32 -> uint32 in the same order (a larger value has a larger key)."""
    b = s.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)


@triton.jit
def _key_value(key):
    """The float32 of an order key (inverse of _order_key)."""
    return tl.where((key >> 31) != 0, key ^ 0x80000000, key ^ 0xFFFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _radix_select(row, V, t_div, vmax, floor_key, want, MASS: tl.constexpr, PRECISE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The largest key u among the row's elements with key >= floor_key such that those with key >= u
    count at least `want` (MASS: weigh each by exp(value - vmax), and `want` is a fraction of their
    total). Eight passes, one 4-bit digit of the key each, most significant first."""
    bins = tl.arange(0, 16)
    prefix = tl.zeros((), dtype=tl.uint32)
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        hist = tl.zeros((16,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            m = cols < V
            s = _scaled(row, cols, m, t_div, PRECISE)
            key = _order_key(s)
            ok = m & (key >= floor_key)
            if level > 0:  # the digits chosen so far
                ok = ok & ((key >> (shift + 4)) == (prefix >> (shift + 4)))
            digit = (key >> shift) & 15
            if MASS:
                w = tl.where(ok, tl.exp(s - vmax), 0.0)
            else:
                w = ok.to(tl.float32)
            hist += tl.sum(tl.where(digit[:, None] == bins[None, :], w[:, None], 0.0), axis=0)
        total = tl.sum(hist, axis=0)
        if MASS and level == 0:
            want = want * total
        suffix = total - tl.cumsum(hist, axis=0) + hist  # weight of digits >= d
        # the largest non-empty digit whose suffix reaches `want`; the lowest non-empty one if rounding
        # left every suffix short (keep everything below)
        lowest = tl.min(tl.where(hist > 0, bins, 16), axis=0)
        d = tl.max(tl.where(((suffix >= want) & (hist > 0)) | (bins == lowest), bins, 0), axis=0)
        want -= tl.sum(tl.where(bins == d, suffix - hist, 0.0), axis=0)
        prefix = prefix | (d.to(tl.uint32) << shift)
    return prefix


@triton.jit
def _threshold_kernel(
    logits_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, thresh_ptr, V, stride_l,
    PRECISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The smallest value row r keeps under top_k, then top_p, then min_p (-inf: keep all)."""
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * stride_l
    temp = tl.load(temp_ptr + r)
    t_div = tl.where(temp == 0.0, 1.0, temp)
    k = tl.load(topk_ptr + r)
    top_p = tl.load(topp_ptr + r)
    min_p = tl.load(minp_ptr + r)
    thr = -float("inf")
    if temp != 0.0:  # greedy rows take the argmax; no filter
        vmax = -float("inf")
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            vmax = tl.maximum(vmax, tl.max(_scaled(row, cols, cols < V, t_div, PRECISE), axis=0))
        floor_key = tl.zeros((), dtype=tl.uint32)
        if (k > 0) & (k < V):  # the k-th largest value (duplicates counted)
            floor_key = _radix_select(row, V, t_div, vmax, floor_key, k.to(tl.float32), False, PRECISE, BLOCK)
            thr = _key_value(floor_key)
        if top_p < 1.0:  # of the top-k mass, the smallest prefix holding top_p
            thr = tl.maximum(thr, _key_value(_radix_select(row, V, t_div, vmax, floor_key, top_p, True, PRECISE,
                                                           BLOCK)))
        if min_p > 0.0:  # probability >= min_p x the largest one
            thr = tl.maximum(thr, vmax + tl.log(min_p))
    tl.store(thresh_ptr + r, thr)


def filter_thresholds(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """[R] float32: the smallest temperature-scaled logit each row keeps (-inf: all; greedy rows -inf)."""
    rows, vocab = logits.shape
    thresh = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _threshold_kernel[(rows,)](
        logits, temperature.float().contiguous(), top_k.to(torch.int32).contiguous(), top_p.float().contiguous(),
        min_p.float().contiguous(), thresh, vocab, logits.stride(0), PRECISE=not triton.knobs.runtime.interpret,
        BLOCK=512, num_warps=8,  # 1024 or 4 warps spill (bench/compile_check.py)
    )
    return thresh


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    filter_needed: bool = True,
) -> torch.Tensor:
    """Pick one token per row.

    logits: [R, V] float32 (already biased and penalized; not modified); temperature: [R] float32,
    0 means greedy (argmax of the logits); top_k: [R] int32, 0 = off; top_p: [R] float32 in (0, 1];
    min_p: [R] float32 in [0, 1]; seeds: [R] int64; positions: [R] int64 (the index of the token
    being generated, the counter of the noise); filter_needed: False when no row uses top_k, top_p
    < 1 or min_p > 0 (skips the sort). Returns [R] int64 token ids.
    Filters apply to the temperature-scaled distribution in the order top_k, top_p, min_p; the most
    likely token always survives.
    """
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1
    rows, vocab = logits.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    temp = temperature.float().contiguous()
    seeds, positions = seeds.contiguous(), positions.contiguous()
    precise = not triton.knobs.runtime.interpret
    thresh = filter_thresholds(logits, temp, top_k, top_p, min_p) if filter_needed else None
    block = 1024
    chunk = min(8192, triton.cdiv(vocab, block) * block)
    n_chunks = triton.cdiv(vocab, chunk)
    best = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, n_chunks), dtype=torch.int64, device=logits.device)
    _sample_kernel[(rows, n_chunks)](
        logits, temp, seeds, positions, thresh, best, idx, vocab, logits.stride(0), n_chunks,
        HAS_THRESH=thresh is not None, PRECISE=precise, BLOCK=block, CHUNK=chunk,
        num_warps=4,
    )
    return idx.gather(1, best.argmax(1, keepdim=True)).squeeze(1)


@triton.jit
def _bitmask_kernel(logits_ptr, rows_ptr, mask_ptr, vocab, logits_stride, mask_stride, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < vocab
    row = tl.load(rows_ptr + g)
    words = tl.load(mask_ptr + g * mask_stride + offs // 32, mask=inside, other=0)
    forbidden = ((words >> (offs % 32)) & 1) == 0
    tl.store(logits_ptr + row * logits_stride + offs, float("-inf"), mask=inside & forbidden)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmasks: torch.Tensor) -> None:
    """Constrained decoding: set to -inf, in place, the logits of tokens a row's grammar forbids.

    logits: [R, V] float32; rows: [G] int64, distinct rows that have a grammar; bitmasks:
    [G, W] int32 with 32 * W >= V, bit t % 32 of word t // 32 set where token t is allowed.
    """
    g, words = bitmasks.shape
    vocab = logits.shape[1]
    assert words * 32 >= vocab, "the bitmask must cover the vocabulary"
    assert logits.stride(1) == 1 and bitmasks.stride(1) == 1
    if g == 0:
        return
    block = 4096
    _bitmask_kernel[(g, triton.cdiv(vocab, block))](logits, rows, bitmasks, vocab, logits.stride(0),
                                                   bitmasks.stride(0), BLOCK=block)
