"""Token sampling on the GPU: the fast twin of `hybridserve/ops/reference/sampling.py::sample_tokens`.

Same tokens as the reference for the same (seed, position): the counter-based noise is the same
32-bit hash in uint32 arithmetic (the per-row key too, in the kernel: no host-side chain of small ops), the Gumbel keys use correctly rounded division and log
(libdevice), and ties go to the lowest index as torch.argmax does.

One kernel per step streams each row once, split over (row, vocabulary chunk) programs so a single
row still fills the GPU: temperature, noise, Gumbel key and the chunk's argmax (greedy rows: argmax of
the raw logits) — no [R, V] noise, key or scatter tensors; a [R, chunks] argmax picks the winner
(the first chunk on ties, so the lowest index wins). Filtering keeps a
*prefix* of the sorted distribution (top-k, top-p and min-p all cut the descending order), so it
reduces to one threshold per row: the smallest kept value. The threshold comes from
`torch.topk(max top_k)` when every row has 1 <= top_k <= 1024 (one small host read of top_k's range),
else from a values-only sort. Ties at the threshold are all kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from hybridserve.ops.reference.sampling import drop_sorted

TOPK_FAST_MAX = 1024


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


def _thresholds(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The smallest value each row keeps under the reference's top_k / top_p / min_p rules."""
    vocab = scaled.shape[1]
    kmin, kmax = torch.stack([top_k.min(), top_k.max()]).tolist()
    if 1 <= kmin and kmax <= TOPK_FAST_MAX:
        vals = torch.topk(scaled, int(kmax), dim=-1, sorted=True).values  # [R, kmax]
    else:
        vals = torch.sort(scaled, dim=-1, descending=True).values
    vals, drop = drop_sorted(vals, top_k, top_p, min_p, vocab)
    kept = (~drop).sum(-1)  # a prefix of the descending order
    return vals.gather(1, (kept - 1)[:, None]).squeeze(1).contiguous()


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
    thresh = None
    if filter_needed:
        greedy = temp == 0
        scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
        thresh = _thresholds(scaled, top_k, top_p, min_p)
    block = 1024
    chunk = min(8192, triton.cdiv(vocab, block) * block)
    n_chunks = triton.cdiv(vocab, chunk)
    best = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, n_chunks), dtype=torch.int64, device=logits.device)
    _sample_kernel[(rows, n_chunks)](
        logits, temp, seeds, positions, thresh, best, idx, vocab, logits.stride(0), n_chunks,
        HAS_THRESH=thresh is not None, PRECISE=not triton.knobs.runtime.interpret, BLOCK=block, CHUNK=chunk,
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
