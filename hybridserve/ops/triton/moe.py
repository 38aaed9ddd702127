"""Sigmoid-routed mixture of non-gated squared-ReLU experts.

Routing (float32): score = sigmoid(logits); choose top-k on score + correction bias; weight with
the *unbiased* score, renormalise, multiply by the routed scaling factor. Expert e computes
down_e(relu(up_e(x))^2). The shared expert is added by the model layer, not here.

Triton:
- `moe_route`: one program per token; top-k by k rounds of (max, lowest index at the max, mask).
- `fused_moe`: the T*K (token, expert) pairs are sorted by expert and each expert's run padded to
  BLOCK_M by two small kernels (a counting sort: atomic ranks, then a scatter; no host sync, so
  decode steps stay graph-capturable). Then one grouped GEMM launch per projection: every BLOCK_M
  tile belongs to one expert and streams only that expert's weights. Up: gather token rows,
  x @ w_up[e]^T, relu^2, store in sorted order. Down: h @ w_down[e]^T rounded to x's dtype (as the
  reference rounds each matmul), stored per pair; a last kernel sums each token's K rows times their
  routing weights in float32 (deterministic; no float32 atomics, no zero-fill, no cast pass).
  Grids are sized by upper bounds; programs past the last tile exit.
- Large batches use two tile heights in one launch: each expert's run is padded to SMALL_M rows
  only, covered by as many BLOCK_M-row tiles as fit plus SMALL_M-row tiles for the rest (≈ 192 rows
  an expert at 4096 tokens: one 128-row and one 64-row tile instead of two 128-row ones), so less of
  the MMA work is padding and each expert's weights still stream once. The k mask of the main loop
  is dropped where K % BLOCK_K == 0.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.fp8 import FP8_DTYPE, _quantize_tile, _scale_tile, quantize_fp8


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, E, stride_l, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, RENORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    es = tl.arange(0, BLOCK_E)
    emask = es < E
    score = tl.sigmoid(tl.load(logits_ptr + t * stride_l + es, mask=emask, other=0.0).to(tl.float32))
    sel = tl.where(emask, score + tl.load(bias_ptr + es, mask=emask, other=0.0).to(tl.float32), -float("inf"))
    ks = tl.arange(0, K_PAD)
    weights = tl.zeros((K_PAD,), dtype=tl.float32)
    ids = tl.zeros((K_PAD,), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(sel, axis=0)
        idx = tl.min(tl.where(sel == best, es, BLOCK_E), axis=0)
        hit = es == idx
        weights = tl.where(ks == k, tl.sum(tl.where(hit, score, 0.0), axis=0), weights)
        ids = tl.where(ks == k, idx.to(tl.int64), ids)
        sel = tl.where(hit, -float("inf"), sel)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    kmask = ks < TOP_K
    tl.store(w_ptr + t * TOP_K + ks, weights * scale, mask=kmask)
    tl.store(ids_ptr + t * TOP_K + ks, ids, mask=kmask)


@triton.jit
def _moe_tile(
    a_ptr, w_ptr, out_ptr, sorted_ptr, e, row0, pid_n,
    N, K, num_pairs, stride_am, stride_we, stride_wn, stride_wk, stride_om,
    a_scale_ptr, a_scale_stride, w_scale_ptr, ws_stride_e, ws_stride_n, out_scale_ptr,
    TOP_K: tl.constexpr, UP: tl.constexpr, PAIR_MODE: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_K: tl.constexpr,
    FP8: tl.constexpr, W8A16: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The BLOCK_M x BLOCK_N output tile of expert e at sorted rows row0.. and columns pid_n * BLOCK_N..
    UP: a = x (rows gathered by token), out = relu(a w^T)^2 at sorted rows.
    not UP: a = h (sorted rows), out[pair] = a w^T.
    PAIR_MODE: the tile is pair row0 // BLOCK_M alone (its row 0). EVEN_K: K % BLOCK_K == 0 (no k mask).
    FP8: w is e4m3 with scales w_scale[e * ws_stride_e + col * ws_stride_n]; a is e4m3 with scales
    a_scale[row * a_scale_stride] (per token for UP, per sorted row for the down projection; stride 0:
    one static scale), or any float quantized here with the static a_scale; an e4m3 `out` (UP) is
    quantized with the static out_scale. W8A16 (with FP8): weight-only fp8, for decode, where the
    weights' bytes are the cost: e4m3 weights widened to ACT in registers, a 16-bit dot on the
    unquantized activations, the weight scales applied to the fp32 tile (a_scale is then 1).
    ACT: the activation dtype each matmul is rounded to."""
    rows = row0 + tl.arange(0, BLOCK_M)
    if PAIR_MODE:
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, row0 // BLOCK_M, num_pairs)
    else:
        pair = tl.load(sorted_ptr + rows)
    valid = pair < num_pairs
    if UP:
        arow = (pair // TOP_K).to(tl.int64)
    else:
        arow = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + arow[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + e * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    if FP8 and not W8A16 and a_ptr.dtype.element_ty != tl.float8e4nv:  # quantized in the loads
        a_static = tl.load(a_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (ks < K - k0) | EVEN_K  # all-true masks compile away
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        if FP8 and not W8A16 and a_ptr.dtype.element_ty != tl.float8e4nv:
            a = _quantize_tile(a, a_static)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if W8A16:
            w = w.to(ACT)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if FP8:
        acc = _scale_tile(acc, a_scale_ptr, arow, a_scale_stride, w_scale_ptr + e * ws_stride_e, cols, ws_stride_n,
                          valid, nmask)
    # the reference rounds each matmul to the activation dtype
    acc = acc.to(ACT).to(tl.float32)
    omask = valid[:, None] & nmask[None, :]
    if UP:
        acc = tl.maximum(acc, 0.0)
        h = (acc * acc).to(ACT)
        if out_ptr.dtype.element_ty == tl.float8e4nv:
            h = _quantize_tile(h, tl.load(out_scale_ptr))
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=omask)
    else:
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["num_pairs"])  # varies per step: no recompile per value
def _moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ptr, tile_expert_ptr, tile_row_ptr,
    N, K, num_pairs, num_experts,
    stride_am, stride_we, stride_wn, stride_wk, stride_om,
    a_scale_ptr, a_scale_stride, w_scale_ptr, ws_stride_e, ws_stride_n, out_scale_ptr,
    TOP_K: tl.constexpr, UP: tl.constexpr, PAIR_MODE: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_K: tl.constexpr,
    FP8: tl.constexpr, W8A16: tl.constexpr, ACT: tl.constexpr,
    MIXED: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program = (tile, N block). Not MIXED: tile t has BLOCK_M rows from t * BLOCK_M. MIXED: tile_row[t] =
    2 * first row + (1 for a SMALL_M-row tile, 0 for a BLOCK_M-row one).
    PAIR_MODE: tile t is pair t; tile_expert is then the flat topk_ids."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if e >= num_experts:  # past the last tile
        return
    if MIXED:
        info = tl.load(tile_row_ptr + tile)
        if info % 2 == 1:
            _moe_tile(a_ptr, w_ptr, out_ptr, sorted_ptr, e, info // 2, pid_n, N, K, num_pairs, stride_am, stride_we,
                      stride_wn, stride_wk, stride_om, a_scale_ptr, a_scale_stride, w_scale_ptr, ws_stride_e,
                      ws_stride_n, out_scale_ptr, TOP_K, UP, PAIR_MODE, DOT_PREC, EVEN_K, FP8, W8A16, ACT,
                      SMALL_M, BLOCK_N, BLOCK_K)
        else:
            _moe_tile(a_ptr, w_ptr, out_ptr, sorted_ptr, e, info // 2, pid_n, N, K, num_pairs, stride_am, stride_we,
                      stride_wn, stride_wk, stride_om, a_scale_ptr, a_scale_stride, w_scale_ptr, ws_stride_e,
                      ws_stride_n, out_scale_ptr, TOP_K, UP, PAIR_MODE, DOT_PREC, EVEN_K, FP8, W8A16, ACT,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _moe_tile(a_ptr, w_ptr, out_ptr, sorted_ptr, e, tile * BLOCK_M, pid_n, N, K, num_pairs, stride_am, stride_we,
                  stride_wn, stride_wk, stride_om, a_scale_ptr, a_scale_stride, w_scale_ptr, ws_stride_e,
                  ws_stride_n, out_scale_ptr, TOP_K, UP, PAIR_MODE, DOT_PREC, EVEN_K, FP8, W8A16, ACT,
                  BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _moe_sum_kernel(y_ptr, w_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[t*K + k] in float32, cast to out's dtype."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        y = tl.load(y_ptr + (t * TOP_K + k) * N + cols, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + t * TOP_K + k) * y
    tl.store(out_ptr + t * N + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] float32; correction_bias: [E] float32.

    Returns (topk_weights [T, K] float32, topk_ids [T, K] int64).
    """
    assert router_logits.dim() == 2 and router_logits.stride(-1) == 1
    t, e = router_logits.shape
    assert correction_bias.shape == (e,) and correction_bias.is_contiguous() and 0 < top_k <= e
    weights = torch.empty((t, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=router_logits.device)
    if t:
        _route_kernel[(t,)](
            router_logits, correction_bias, weights, ids, e, router_logits.stride(0), float(scaling_factor),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(e),
            RENORM=renormalize, num_warps=1,
        )
    return weights, ids


PAIR_MODE_MAX_PAIRS = 32  # up to here every pair is its own block (no sort; few repeated experts)

# Launch shapes per (token count, weight dtype): a small table shipped with the code, regenerated on
# the GPU by `bench/ops.py --moe-sweep --write-table` (each candidate checked against the default).
CONFIG_FILE = Path(__file__).with_name("moe_configs.json")
CONFIGS: dict[str, list[dict]] = {k: v for k, v in json.loads(CONFIG_FILE.read_text()).items() if k in ("bf16", "fp8")}


def _config(num_tokens: int, fp8: bool = False) -> dict:
    """The launch shape for this many tokens: the first table entry whose max_tokens (None: any) covers it.
    Small batches: narrow tiles and many programs streaming weights; prefill: two tile heights."""
    return next(c for c in CONFIGS["fp8" if fp8 else "bf16"] if c["max_tokens"] is None or num_tokens <= c["max_tokens"])


# Prefill launch shapes also tried on H100 (docs/performance.md), all slower than the table's: a
# second launch for the small tiles (streams the weights twice), 64-row tiles only, 3 stages,
# 128-wide N tiles, unmasked row and column loads (more memory traffic).
PREFILL_CANDIDATES = [
    dict(BLOCK_M=128, SMALL_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
]


def describe(cfg: dict) -> str:
    """Short label of a _fused_moe config, e.g. 'M128+64 N256 K64 w8 s4'."""
    small = f"+{cfg['SMALL_M']}" if cfg.get("SMALL_M") else ""
    w8a16 = " w8a16" if cfg.get("W8A16") else ""
    return (f"M{cfg['BLOCK_M']}{small} N{cfg['BLOCK_N']} K{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            f"{w8a16}")


@triton.jit(do_not_specialize=["P"])  # varies per step: no recompile per value
def _rank_kernel(ids_ptr, counts_ptr, rank_ptr, P, BLOCK: tl.constexpr):
    """rank[i] = how many pairs of the same expert took a rank before i (atomic counter)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    e = tl.load(ids_ptr + offs, mask=m, other=0)
    r = tl.atomic_add(counts_ptr + e, tl.full((BLOCK,), 1, tl.int32), mask=m, sem="relaxed")
    tl.store(rank_ptr + offs, r, mask=m)


@triton.jit(do_not_specialize=["P", "num_tiles"])  # varies per step: no recompile per value
def _scatter_kernel(ids_ptr, counts_ptr, rank_ptr, sorted_ptr, tile_expert_ptr, tile_row_ptr, P, E, num_tiles,
                    BM: tl.constexpr, SM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """sorted[start[e] + rank] = pair, each expert's run padded to SM rows. Tiles in expert order: as
    many BM-row tiles as fit in the padded run, then SM-row tiles for the rest (none when SM == BM).
    tile_expert[t] = owner (E past the end); when SM < BM, tile_row[t] = 2 * first row + (1 if SM rows).
    Each program recomputes the tiny per-expert prefix sums."""
    es = tl.arange(0, BLOCK_E)
    c = tl.load(counts_ptr + es, mask=es < E, other=0)
    padded = (c + SM - 1) // SM * SM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    e = tl.load(ids_ptr + offs, mask=m, other=0)
    r = tl.load(rank_ptr + offs, mask=m, other=0)
    start_e = tl.sum(tl.where(e[:, None] == es[None, :], starts[None, :], 0), axis=1)
    tl.store(sorted_ptr + start_e + r, offs.to(tl.int32), mask=m)
    tmask = offs < num_tiles
    if SM == BM:
        owner = tl.sum((ends[None, :] <= (offs * BM)[:, None]).to(tl.int32), axis=1)
    else:
        big = padded // BM
        ntiles = big + (padded - big * BM) // SM
        tile_ends = tl.cumsum(ntiles, axis=0)
        owner = tl.sum((tile_ends[None, :] <= offs[:, None]).to(tl.int32), axis=1)
        hit = owner[:, None] == es[None, :]
        j = offs - tl.sum(tl.where(hit, (tile_ends - ntiles)[None, :], 0), axis=1)  # tile index in its expert
        nb = tl.sum(tl.where(hit, big[None, :], 0), axis=1)
        row0 = tl.sum(tl.where(hit, starts[None, :], 0), axis=1) + tl.where(j < nb, j * BM, nb * BM + (j - nb) * SM)
        tl.store(tile_row_ptr + offs, 2 * row0 + (j >= nb).to(tl.int32), mask=tmask)
    tl.store(tile_expert_ptr + offs, owner, mask=tmask)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int, small_m: int | None = None):
    """Sort the flattened (token, k) pairs by expert, each expert's run padded to small_m (default
    block_m) and covered by block_m-row tiles plus, when small_m < block_m, small_m-row tiles for the rest.

    Returns (sorted_pairs [rows] int32, pad entries = T*K; tile_expert [max_tiles] int32, = num_experts
    past the last tile; tile_row [max_tiles] int32 = 2 * first row + (1 for a small tile), or None when
    small_m == block_m: tile t then starts at row t * block_m). Device work only, sized by upper bounds.
    Within an expert the order of pairs is arbitrary (rows of a tile are independent).
    """
    small_m = small_m or block_m
    assert block_m % small_m == 0
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    dev = flat.device
    used = min(num_experts, pairs)  # experts with any pair
    # each used expert pads by < small_m rows; big tiles tile the padded rows, < block_m / small_m small ones each
    rows = pairs + used * (small_m - 1)
    max_tiles = rows // block_m + used * (block_m // small_m - 1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(pairs, dtype=torch.int32, device=dev)
    sorted_pairs = torch.full((rows,), pairs, dtype=torch.int32, device=dev)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=dev)
    tile_row = torch.empty(max_tiles, dtype=torch.int32, device=dev) if small_m < block_m else None
    block = 64  # the one-hot [block, E] tiles stay in registers
    _rank_kernel[(triton.cdiv(pairs, 1024),)](flat, counts, rank, pairs, BLOCK=1024, num_warps=4)
    _scatter_kernel[(triton.cdiv(max(pairs, max_tiles), block),)](
        flat, counts, rank, sorted_pairs, tile_expert, tile_row, pairs, num_experts, max_tiles,
        BM=block_m, SM=small_m, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK=block, num_warps=4,
    )
    return sorted_pairs, tile_expert, tile_row


def fused_moe(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    a_up_scale: torch.Tensor | None = None,
    a_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts for every token.

    x: [T, hidden]; w_up: [E, I, hidden]; w_down: [E, hidden, I]; topk_weights: [T, K] float32;
    topk_ids: [T, K] int. Returns [T, hidden] in x's dtype: sum_k w[t,k] * expert_{id[t,k]}(x[t]),
    each expert's two matmuls rounded to x's dtype, the weighted sum accumulated in float32.
    FP8 experts (w_up, w_down float8_e4m3fn): w_*_scale float32 [E] (per expert) or [E, N] (per
    output channel); each matmul is `fp8_linear` (its input quantized with the static a_*_scale []
    float32, or per row when None).
    """
    fp8 = w_up_scale is not None
    return _fused_moe(x, w_up, w_down, topk_weights, topk_ids, _config(x.shape[0], fp8),
                      w_up_scale, w_down_scale, a_up_scale, a_down_scale)


_ACT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    """float32 1.0 on `device`, weight-only fp8's activation scale: made once, not per call (a decode
    graph would replay the fill of a fresh one in every MoE layer)."""
    return torch.ones((), dtype=torch.float32, device=device)


def _fused_moe(x, w_up, w_down, topk_weights, topk_ids, cfg: dict, w_up_scale=None, w_down_scale=None,
               a_up_scale=None, a_down_scale=None) -> torch.Tensor:
    """cfg: BLOCK_M/N/K, num_warps, num_stages, optional SMALL_M (see PREFILL_CANDIDATES), optional
    W8A16 (fp8 weights only: weight-only fp8, see _moe_tile)."""
    t, hidden = x.shape
    e, inter, _ = w_up.shape
    assert w_up.shape == (e, inter, hidden) and w_down.shape == (e, hidden, inter)
    assert w_up.stride(-1) == 1 and w_down.stride(-1) == 1 and x.stride(-1) == 1
    fp8 = w_up_scale is not None
    if fp8:
        assert w_up.dtype == w_down.dtype == FP8_DTYPE and w_down_scale is not None
        assert w_up_scale.shape in ((e,), (e, inter)) and w_down_scale.shape in ((e,), (e, hidden))
    else:
        assert w_up.dtype == w_down.dtype == x.dtype, "weights and activations share one dtype"
    top_k = topk_ids.shape[1]
    assert topk_ids.shape == topk_weights.shape == (t, top_k)
    out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    pairs = t * top_k
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    pair_mode = pairs <= PAIR_MODE_MAX_PAIRS
    sm = bm if pair_mode else cfg.get("SMALL_M", bm)
    if pair_mode:
        sorted_pairs, tile_expert, tile_row = None, topk_ids.reshape(-1), None
        rows = pairs * bm
    else:
        sorted_pairs, tile_expert, tile_row = align_by_expert(topk_ids, e, bm, sm)
        rows = sorted_pairs.shape[0]
    w8a16 = fp8 and cfg.get("W8A16", False)
    if w8a16:  # weight-only: activations stay in x's dtype, their scale is 1
        a_up_scale = a_down_scale = _unit_scale(x.device)
    # fp8 with a static scale for the down projection: the up kernel writes h in e4m3 directly
    h_fp8 = fp8 and a_down_scale is not None and not w8a16
    h = torch.empty((rows, inter), dtype=FP8_DTYPE if h_fp8 else x.dtype, device=x.device)
    y = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    a_up, s_up = (quantize_fp8(x) if a_up_scale is None else (x, a_up_scale)) if fp8 else (x, x)
    for up in (True, False):
        if up:
            a, w, dst, n, k, s_a, s_w = a_up, w_up, h, inter, hidden, s_up, w_up_scale
        else:
            a, w, dst, n, k, s_w = h, w_down, y, hidden, inter, w_down_scale
            s_a = a_down_scale
            if fp8 and a_down_scale is None:  # per-row scales of h need all of its row: one more pass
                a, s_a = quantize_fp8(h)
        scales = (s_a, int(s_a.dim() > 0), s_w, s_w.stride(0), int(s_w.dim() > 1), a_down_scale if up else x) if fp8 \
            else (x, 0, x, 0, 0, x)
        _moe_gemm_kernel[(tile_expert.shape[0] * triton.cdiv(n, bn),)](
            a, w, dst, sorted_pairs, tile_expert, tile_row,
            n, k, pairs, e,
            a.stride(0), w.stride(0), w.stride(1), w.stride(2), dst.stride(0), *scales,
            TOP_K=top_k, UP=up, PAIR_MODE=pair_mode, DOT_PREC=prec, EVEN_K=k % bk == 0, FP8=fp8, W8A16=w8a16,
            ACT=_ACT[x.dtype],
            MIXED=sm < bm, BLOCK_M=bm, SMALL_M=sm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    tw = topk_weights.float().contiguous()
    block = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(t, triton.cdiv(hidden, block))](y, tw, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=4)
    return out
