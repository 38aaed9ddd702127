"""Triton kernels against their reference twins, shared by tests/gpu (CUDA, model-sized shapes) and
tests/ops_interp (CPU through Triton's interpreter, small shapes). The importing module provides
the fixtures `device` and `big`.

Tolerance: `gold` is the reference evaluated on float32 copies of the same (rounded) inputs. The
reference run in the test dtype has an error against gold (its own roundings); the kernel must be
within `C_TOL` times that error plus a small epsilon. Updated states are checked over the whole
cache, so a slot that should not change must stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from hybridserve.ops import reference as R
from hybridserve.ops import triton as K  # noqa: N812

C_TOL = 2.0
EPS = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}
DTYPES = [torch.float32, torch.bfloat16]
FP8 = torch.float8_e4m3fn


def rel_err(a: torch.Tensor, gold: torch.Tensor) -> float:
    a, gold = a.double(), gold.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - gold).norm() / gold.norm().clamp_min(1e-30)).item()


def check(kernel_out, ref_out, gold, dtype, what=""):
    assert kernel_out.shape == gold.shape and kernel_out.dtype == ref_out.dtype, what
    ek, er = rel_err(kernel_out, gold), rel_err(ref_out, gold)
    assert ek <= C_TOL * er + EPS[dtype], f"{what}: kernel error {ek:.3e} vs reference error {er:.3e}"


def f32(*ts):
    return [t.float() if t is not None and t.is_floating_point() else t for t in ts]


def packed(lens, device):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------------ norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, big, dtype, with_residual):
    hidden = 2688 if big else 100
    for t in (1, 7, 33):
        x = torch.randn(t, hidden, device=device).to(dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        res = torch.randn(t, hidden, device=device).to(dtype) if with_residual else None
        out_k, res_k = K.rms_norm(x, w, 1e-5, res)
        out_r, res_r = R.rms_norm(x, w, 1e-5, res)
        out_g, res_g = R.rms_norm(*f32(x, w), 1e-5, *f32(res))
        check(out_k, out_r, out_g, dtype, "normed")
        torch.testing.assert_close(res_k, res_r, rtol=0, atol=0)  # the sum is one rounding either way


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm(device, big, dtype):
    d, gs = (4096, 512) if big else (96, 48)  # non-power-of-two group on the small path
    for t in (1, 9):
        proj = torch.randn(t, 2 * d + 5, device=device).to(dtype)
        y, z = proj[:, :d], proj[:, d : 2 * d]  # strided views, as sliced from in_proj's output
        w = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
        out_k = K.gated_rms_norm(y, z, w, gs, 1e-5)
        out_r = R.gated_rms_norm(y, z, w, gs, 1e-5)
        out_g = R.gated_rms_norm(*f32(y, z, w), gs, 1e-5)
        check(out_k, out_r, out_g, dtype, "gated")


# ------------------------------------------------------------------------------------------ conv


def _conv_inputs(device, big, dtype, nseq):
    c = 6144 if big else 40
    kw = 4
    slots = torch.randperm(nseq + 3, device=device)[:nseq]
    state = torch.randn(nseq + 3, kw, c, device=device).to(dtype)
    w = torch.randn(c, kw, device=device).to(dtype) * 0.5
    bias = torch.randn(c, device=device).to(dtype)
    return c, slots, state, w, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d(device, big, dtype, with_bias):
    lens = [1, 2, 5, 37, 3, 70] if not big else [1, 2, 3, 300, 1000, 17]
    nseq = len(lens)
    c, slots, state, w, bias = _conv_inputs(device, big, dtype, nseq)
    bias = bias if with_bias else None
    cu = packed(lens, device)
    init = torch.tensor([i % 3 != 1 for i in range(nseq)], device=device)
    # sequences with state continue at assorted positions (ring rows wrap), fresh ones start at 0
    starts = [0 if i % 3 == 1 else 5 * i + 2 for i in range(nseq)]
    seq_lens = torch.tensor([s + n for s, n in zip(starts, lens)], dtype=torch.int32, device=device)
    proj = torch.randn(sum(lens), c + 7, device=device).to(dtype)
    x = proj[:, 3 : 3 + c]  # a strided view
    s_k, s_r, s_g = state.clone(), state.clone(), state.float()
    out_k = K.causal_conv1d(x, w, bias, cu, seq_lens, s_k, slots, init)
    out_r = R.causal_conv1d(x, w, bias, cu, seq_lens, s_r, slots, init)
    out_g = R.causal_conv1d(*f32(x, w, bias), cu, seq_lens, s_g, slots, init)
    check(out_k, out_r, out_g, dtype, "conv out")
    torch.testing.assert_close(s_k, s_r, rtol=0, atol=0)  # raw rows are copied, never computed
    # then a few decode steps on top of the prefilled states
    for _ in range(3):
        seq_lens = seq_lens + 1
        xu = torch.randn(nseq, c, device=device).to(dtype)
        out_k = K.causal_conv1d_update(xu, w, bias, seq_lens, s_k, slots)
        out_r = R.causal_conv1d_update(xu, w, bias, seq_lens, s_r, slots)
        out_g = R.causal_conv1d_update(*f32(xu, w, bias), seq_lens, s_g, slots)
        check(out_k, out_r, out_g, dtype, "conv update out")
        torch.testing.assert_close(s_k, s_r, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- fp8
# FP8 kernels against the reference (same quantization rules) and against `gold`: float32 math on the
# dequantized weights with unquantized activations. The reference's error against gold is the FP8
# error; the kernel must stay within C_TOL times it.


def _fp8_weight(n, k, device, per_channel, e=None):
    """(e4m3 weight [(e,) n, k], float32 scale [] / [n] (experts: [e] / [e, n]), dequantized float32)."""
    from hybridserve.model.linear import quantize_weight

    shape = (n, k) if e is None else (e, n, k)
    w = torch.randn(shape, device=device) / k**0.5
    if e is None:
        q, s = quantize_weight(w, per_channel)
    else:
        pairs = [quantize_weight(w[j], per_channel) for j in range(e)]
        q, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    return q, s, q.float() * (s[..., None] if per_channel else s.reshape(*s.shape, *([1] * 2)[: 2 - (e is None)]))


@pytest.mark.parametrize("static", [False, True])
def test_quantize_fp8(device, big, static):
    k = 2688 if big else 100
    for t in (1, 7, 33):
        x = (torch.randn(t, k + 3, device=device) * 3).to(torch.bfloat16)[:, 2 : 2 + k]  # a strided view
        x[0, :5] = 0 if t > 1 else x[0, :5]
        scale = torch.tensor(0.004, device=device) if static else None  # static: some values saturate
        q_k, s_k = K.quantize_fp8(x, scale)
        q_r, s_r = R.quantize_fp8(x, scale)
        assert q_k.dtype == FP8 and s_k.shape == s_r.shape and s_k.dtype == torch.float32
        torch.testing.assert_close(s_k, s_r, rtol=0, atol=0)
        assert torch.equal(q_k.view(torch.uint8), q_r.view(torch.uint8))  # both round x / s to nearest


def _fp8_linear_backends(device):
    return ["triton", "scaled_mm"] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) \
        else ["triton"]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear(device, big, per_channel, static):
    from hybridserve.ops.triton import fp8 as KF

    shapes = [(2688, 10304), (4096, 2688), (2688, 3712), (48, 80)] if big else [(64, 48), (100, 50)]
    for k, n in shapes:
        w, ws, w_deq = _fp8_weight(n, k, device, per_channel)
        for t in (1, 7, 33, 300) if big else (1, 7, 33):
            x = torch.randn(t, k, device=device).to(torch.bfloat16)
            s_in = (x.float().abs().amax() / 448).reshape(()) if static else None
            out_r = R.fp8_linear(x, w, ws, s_in)
            gold = x.float() @ w_deq.t()
            for backend in _fp8_linear_backends(device):
                if backend == "scaled_mm" and (k % 16 or n % 16):
                    continue
                out_k = KF._fp8_linear(x, w, ws, s_in, KF.gemm_config(t), backend)
                check(out_k, out_r, gold, torch.bfloat16, f"fp8_linear {backend} T={t} K={k} N={n}")
            assert K.fp8_linear(x, w, ws, s_in).shape == (t, n)  # the shape's own pick of backend
            assert rel_err(out_r, gold) < 0.08  # the FP8 error itself: e4m3's 3 mantissa bits


def _moe_fp8_case(device, e, k, hidden, inter, t, per_channel, static, cfgs=None, skew=False):
    from hybridserve.ops.triton import moe as KM

    w_up, s_up, up_deq = _fp8_weight(inter, hidden, device, per_channel, e)
    w_down, s_down, down_deq = _fp8_weight(hidden, inter, device, per_channel, e)
    x = torch.randn(t, hidden, device=device).to(torch.bfloat16)
    logits = torch.randn(t, e, device=device)
    if skew:
        logits[:, :4] += 3
    w, ids = R.moe_route(logits, torch.zeros(e, device=device), k, 2.5)
    a_up = a_down = None
    if static:  # calibrated as ModelOpt does: amax / 448 of each matmul's input over the routed tokens
        a_up = (x.float().abs().amax() / 448).reshape(())
        h_amax = max((torch.relu(x[(ids == j).any(-1)].float() @ up_deq[j].t()) ** 2).amax()
                     for j in ids.unique().tolist())
        a_down = (h_amax / 448).reshape(())
    scales = (s_up, s_down, a_up, a_down)
    out_r = R.fused_moe(x, w_up, w_down, w, ids, *scales)
    gold = R.fused_moe(x.float(), up_deq, down_deq, w, ids)
    for cfg in cfgs or [None]:
        out_k = K.fused_moe(x, w_up, w_down, w, ids, *scales) if cfg is None else \
            KM._fused_moe(x, w_up, w_down, w, ids, cfg, *scales)
        check(out_k, out_r, gold, torch.bfloat16, f"fp8 moe T={t} {KM.describe(cfg) if cfg else ''}")
    assert rel_err(out_r, gold) < 0.1


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_fused_moe_fp8(device, big, per_channel, static):
    e, k, hidden, inter = (128, 6, 2688, 1856) if big else (16, 3, 64, 48)
    for t in ((1, 5, 64, 700) if big else (1, 5, 40)):  # tiny batches leave most experts empty
        _moe_fp8_case(device, e, k, hidden, inter, t, per_channel, static, skew=t == 40)


def test_fused_moe_fp8_configs(device, big):
    """Every fp8 launch shape of the table (and the prefill candidates) computes the same function."""
    from hybridserve.ops.triton import moe as KM

    cfgs = KM.CONFIGS["fp8"]
    _moe_fp8_case(device, 16, 3, 128, 48, 203, True, True, cfgs, skew=True)
    _moe_fp8_case(device, 16, 3, 128, 48, 203, False, False, cfgs[-1:], skew=True)
    if big:
        _moe_fp8_case(device, 128, 6, 2688, 1856, 2048, False, True, cfgs)


# ------------------------------------------------------------------------------------------- moe


def test_moe_route(device, big):
    t, e, k = (300, 128, 6) if big else (37, 16, 3)
    logits = torch.randn(t, e, device=device) * 2
    bias = torch.randn(e, device=device) * 0.1
    for renorm in (True, False):
        w_k, id_k = K.moe_route(logits, bias, k, 2.5, renorm)
        w_r, id_r = R.moe_route(logits, bias, k, 2.5, renorm)
        assert id_k.dtype == torch.int64 and torch.equal(id_k, id_r)
        torch.testing.assert_close(w_k, w_r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe(device, big, dtype):
    e, k, hidden, inter = (128, 6, 2688, 1856) if big else (16, 3, 64, 48)
    w_up = (torch.randn(e, inter, hidden, device=device) / hidden**0.5).to(dtype)
    w_down = (torch.randn(e, hidden, inter, device=device) / inter**0.5).to(dtype)
    for t in ((1, 5, 64, 700) if big else (1, 5, 40)):  # tiny batches leave most experts empty
        x = torch.randn(t, hidden, device=device).to(dtype)
        logits = torch.randn(t, e, device=device)
        if t == 40:  # skewed routing: a few crowded experts, several empty
            logits[:, :4] += 3
        w, ids = R.moe_route(logits, torch.zeros(e, device=device), k, 2.5)
        out_k = K.fused_moe(x, w_up, w_down, w, ids)
        out_r = R.fused_moe(x, w_up, w_down, w, ids)
        out_g = R.fused_moe(*f32(x, w_up, w_down), w, ids)
        check(out_k, out_r, out_g, dtype, f"moe T={t}")


def _moe_check_configs(device, cfgs, e, k, hidden, inter, ids, what):
    from hybridserve.ops.triton import moe as KM

    dtype = torch.bfloat16
    t = ids.shape[0]
    w_up = (torch.randn(e, inter, hidden, device=device) / hidden**0.5).to(dtype)
    w_down = (torch.randn(e, hidden, inter, device=device) / inter**0.5).to(dtype)
    x = torch.randn(t, hidden, device=device).to(dtype)
    w = torch.rand(t, k, device=device) + 0.1
    out_r = R.fused_moe(x, w_up, w_down, w, ids)
    out_g = R.fused_moe(*f32(x, w_up, w_down), w, ids)
    for cfg in cfgs:
        out_k = KM._fused_moe(x, w_up, w_down, w, ids, cfg)
        check(out_k, out_r, out_g, dtype, f"moe {what} [{KM.describe(cfg)}]")


# pairs per expert for the awkward-shape case: exactly 128 and 64 rows, one past 128, 3 x 64, one
# short of 64, a single pair, and empty experts (6-8, 10-15); 609 pairs = 203 tokens x 3
MOE_AWKWARD_COUNTS = {0: 128, 1: 64, 2: 129, 3: 192, 4: 63, 5: 1, 9: 32}


def _moe_ids_with_counts(counts, t, k, device):
    """topk_ids [t, k] with counts[e] pairs of expert e, k distinct experts per token (each run of one
    expert is at most t long and fills the column-major [k, t] grid, so it never repeats in a row)."""
    flat = torch.cat([torch.full((c,), ex, dtype=torch.int64) for ex, c in counts.items()])
    assert flat.numel() == t * k and max(counts.values()) <= t
    return flat.view(k, t).t()[torch.randperm(t)].contiguous().to(device)


def test_moe_align_two_tile_heights(device):
    from hybridserve.ops.triton import moe as KM

    ids = _moe_ids_with_counts(MOE_AWKWARD_COUNTS, 203, 3, device)
    sorted_pairs, tile_expert, tile_row = KM.align_by_expert(ids, 16, 128, 64)
    used = tile_expert < 16
    experts, info = tile_expert[used].tolist(), tile_row[used].tolist()
    # expert order; full 128-row tiles first, then one 64-row tile for the rest of the run
    assert experts == [0, 1, 2, 2, 3, 3, 4, 5, 9]
    assert [i % 2 for i in info] == [0, 1, 0, 1, 0, 1, 1, 1, 1]
    assert [i // 2 for i in info] == [0, 128, 192, 320, 384, 512, 576, 640, 704]
    real = sorted_pairs[sorted_pairs < ids.numel()].sort().values
    assert torch.equal(real.cpu(), torch.arange(ids.numel(), dtype=torch.int32))


def test_fused_moe_prefill_configs(device, big):
    """Every prefill launch shape the benchmark may pick computes the same function (bf16).
    Awkward routing at small dims: T = 203, experts with exactly 64 / 128 rows, empty experts; K = 128
    (a multiple of BLOCK_K = 64) for the up projection, K = 48 (not one) for the down projection, N
    narrower than a tile. The GPU also runs them at the model's shapes with real routing."""
    from hybridserve.ops.triton import moe as KM

    cfgs = KM.PREFILL_CANDIDATES
    ids = _moe_ids_with_counts(MOE_AWKWARD_COUNTS, 203, 3, device)
    _moe_check_configs(device, cfgs, 16, 3, 128, 48, ids, "awkward T=203")
    if big:
        e, k, t = 128, 6, 2048
        _, ids = R.moe_route(torch.randn(t, e, device=device), torch.zeros(e, device=device), k, 2.5)
        _moe_check_configs(device, cfgs, e, k, 2688, 1856, ids, f"T={t}")


# ------------------------------------------------------------------------------------- attention


def _kv_batch(device, dtype, new, cached, hkv, d, bs, num_blocks):
    """Random pages for each sequence; returns (kv_cache, block_tables, cu, seq_lens, slot_mapping)."""
    perm = torch.randperm(num_blocks).tolist()
    tables, i = [], 0
    for n, c in zip(new, cached):
        need = -(-(n + c) // bs)
        tables.append(perm[i : i + need])
        i += need
    width = max(len(tb) for tb in tables)
    bt = torch.tensor([tb + [-1] * (width - len(tb)) for tb in tables], dtype=torch.int32, device=device)
    slots = [tb[pos // bs] * bs + pos % bs for tb, n, c in zip(tables, new, cached) for pos in range(c, c + n)]
    kv = torch.randn(2, num_blocks, bs, hkv, d, device=device).to(dtype)
    lens = torch.tensor([n + c for n, c in zip(new, cached)], dtype=torch.int32, device=device)
    return kv, bt, packed(new, device), lens, torch.tensor(slots, dtype=torch.int64, device=device)


def _attn_case(device, dtype, new, cached, h, hkv, d, bs, fp8=False):
    """Store the new tokens' K/V, then attend. fp8: the cache in e4m3 with per-layer k/v scales
    (gold: float32 attention over the dequantized cache; and within FP8 error of a bf16 cache)."""
    num_blocks = sum(-(-(n + c) // bs) for n, c in zip(new, cached)) + 3
    kv, bt, cu, lens, sm = _kv_batch(device, dtype, new, cached, hkv, d, bs, num_blocks)
    kv_scale = torch.tensor([0.02, 0.015], device=device) if fp8 else None
    if fp8:
        kv = torch.stack([(kv[i].float() / kv_scale[i]).to(FP8) for i in range(2)])
    t = sum(new)
    q = torch.randn(t, h, d, device=device).to(dtype)
    k_new = torch.randn(t, hkv, d, device=device).to(dtype)
    v_new = torch.randn(t, hkv, d, device=device).to(dtype)
    sm[t // 2] = -1  # a padding row is skipped
    kv_k, kv_r = kv.clone(), kv.clone()
    K.store_kv(k_new, v_new, kv_k, sm, kv_scale)
    R.store_kv(k_new, v_new, kv_r, sm, kv_scale)
    assert torch.equal(kv_k.view(torch.uint8), kv_r.view(torch.uint8))
    scale = d**-0.5
    out_k = K.paged_attention(q, kv_r, bt, cu, lens, scale, kv_scale)
    out_r = R.paged_attention(q, kv_r, bt, cu, lens, scale, kv_scale)
    kv_gold = kv_r.float() * kv_scale[:, None, None, None, None] if fp8 else kv_r.float()
    out_g = R.paged_attention(q.float(), kv_gold, bt, cu, lens, scale)
    check(out_k, out_r, out_g, dtype, f"attention new={new} cached={cached}{' fp8' if fp8 else ''}")
    if fp8:  # against the same keys and values kept in dtype
        kv_hi = kv_gold.to(dtype)
        R.store_kv(k_new, v_new, kv_hi, sm)
        assert rel_err(out_k, R.paged_attention(q.float(), kv_hi.float(), bt, cu, lens, scale)) < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill(device, big, dtype):
    h, hkv, d, bs = (32, 2, 128, 16) if big else (6, 2, 16, 4)  # small: group of 3 (padded rows)
    new, cached = ([1, 300, 17, 129], [0, 0, 40, 700]) if big else ([1, 9, 17, 5], [0, 0, 6, 13])
    _attn_case(device, dtype, new, cached, h, hkv, d, bs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode(device, big, dtype):
    h, hkv, d, bs = (32, 2, 128, 16) if big else (4, 2, 16, 4)
    cached = [0, 5, 2100, 63, 1] if big else [0, 5, 70, 3, 1]  # long contexts take split-K
    _attn_case(device, dtype, [1] * len(cached), cached, h, hkv, d, bs)
    _attn_case(device, dtype, [1], [cached[2]], h, hkv, d, bs)  # batch 1: most splits


@pytest.mark.parametrize("fp8", [False, True])
def test_attention_split_k_decode(device, big, fp8):
    """Flash-decoding at long contexts: batch 1 up to max_splits splits, ragged batches where each
    sequence uses the splits its context needs (short ones one), FP8 pages too. Small shapes run
    with small splits so that the interpreter sees many."""
    from hybridserve.ops.triton import attention as KA

    h, hkv, d, bs = (32, 2, 128, 16) if big else (4, 2, 16, 4)
    long = [8191, 33000] if big else [300, 517]
    tune = {} if big else dict(min_split_tokens=16, max_splits=16)
    old = dict(KA.DECODE_TUNE)
    KA.DECODE_TUNE.update(tune)
    try:
        for ctx in long:
            _attn_case(device, torch.bfloat16, [1], [ctx], h, hkv, d, bs, fp8)
        _attn_case(device, torch.bfloat16, [1] * 4, [long[0], 3, long[1] // 3, 40], h, hkv, d, bs, fp8)
    finally:
        KA.DECODE_TUNE.clear()
        KA.DECODE_TUNE.update(old)


def test_attention_prefill_fp8(device, big):
    h, hkv, d, bs = (32, 2, 128, 16) if big else (6, 2, 16, 4)
    new, cached = ([1, 300, 17, 129], [0, 0, 40, 700]) if big else ([1, 9, 17, 5], [0, 0, 6, 13])
    _attn_case(device, torch.bfloat16, new, cached, h, hkv, d, bs, fp8=True)


# -------------------------------------------------------------------------------------- sampling


def _gumbel_keys(logits, temperature, top_k, top_p, min_p, seeds, positions, filt):
    """The reference's sampling keys (argmax of these is the sampled token)."""
    from hybridserve.ops.reference import sampling as S

    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if filt:
        scaled = S.filter_logits(scaled, top_k, top_p, min_p)
    noise = S.uniform_noise(seeds, positions, logits.shape[1])
    keys = scaled - torch.log(-torch.log(noise))
    return torch.where(greedy[:, None], logits, keys)


@pytest.mark.parametrize("filt", [False, True])
def test_sample_tokens(device, big, filt):
    from hybridserve.ops.reference import sampling as S

    rows, vocab = (64, 131072) if big else (12, 10000)  # small: two vocabulary chunks
    logits = torch.randn(rows, vocab, device=device) * 3
    temperature = torch.rand(rows, device=device) + 0.3
    temperature[::5] = 0.0  # greedy rows
    top_k = torch.randint(0, 50, (rows,), device=device, dtype=torch.int32) if filt else torch.zeros(
        rows, dtype=torch.int32, device=device)
    top_p = (torch.rand(rows, device=device) * 0.9 + 0.1) if filt else torch.ones(rows, device=device)
    min_p = (torch.rand(rows, device=device) * 0.2) if filt else torch.zeros(rows, device=device)
    if filt:
        top_p[1] = 1.0
        min_p[2] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (rows,), device=device)  # negative seeds too
    positions = torch.randint(0, 4096, (rows,), device=device)
    args = (logits, temperature, top_k, top_p, min_p, seeds, positions, filt)
    tok_k = K.sample_tokens(*args)
    tok_r = S.sample_tokens(*args)
    assert tok_k.dtype == torch.int64 and tok_k.shape == (rows,)
    # identical tokens, except where two keys tie to within rounding (libm log differences, CPU)
    keys = _gumbel_keys(*args)
    kk, kr = keys.gather(1, tok_k[:, None])[:, 0], keys.gather(1, tok_r[:, None])[:, 0]
    assert torch.isfinite(kk).all(), "the kernel picked a filtered-out token"
    assert ((tok_k == tok_r) | ((kr - kk).abs() <= 1e-5 * kr.abs().clamp_min(1))).all()
    assert (tok_k == tok_r).float().mean() >= 0.9


def _check_kept(thresh, scaled, top_k, top_p, min_p):
    """The finite values at or above each row's threshold are exactly those the reference keeps."""
    from hybridserve.ops.reference import sampling as S

    kept = torch.isfinite(S.filter_logits(scaled, top_k, top_p, min_p))
    assert torch.equal((scaled >= thresh[:, None]) & torch.isfinite(scaled), kept)


def test_filter_thresholds(device, big):
    """The radix-select threshold search against the reference's sort: on distinct values it keeps
    the same tokens; a top-k cut inside a run of equal values keeps the whole run; top_k >= V,
    tiny top_p, min_p and -inf entries (masked tokens) are handled; greedy rows keep everything."""
    from hybridserve.ops.triton.sampling import filter_thresholds

    rows, vocab = (64, 131072) if big else (10, 3000)
    # distinct values (a permutation scaled), so no threshold falls between equal keys
    logits = torch.stack([torch.randperm(vocab, device=device) for _ in range(rows)]).float() * (8.0 / vocab)
    logits[3, ::2] = float("-inf")
    temperature = torch.rand(rows, device=device) + 0.5
    top_k = torch.randint(1, 200, (rows,), device=device, dtype=torch.int32)
    top_k[0], top_k[1], top_k[2] = 0, vocab, vocab + 5
    top_p = torch.rand(rows, device=device) * 0.9 + 0.05
    top_p[4], top_p[5] = 1.0, 1e-6
    min_p = torch.rand(rows, device=device) * 0.3
    min_p[6] = 0.0
    scaled = logits / temperature[:, None]
    _check_kept(filter_thresholds(logits, temperature, top_k, top_p, min_p), scaled, top_k, top_p, min_p)
    # one filter at a time, so each search is checked on its own
    none_k, none_p, none_m = torch.zeros_like(top_k), torch.ones_like(top_p), torch.zeros_like(min_p)
    for args in ((top_k, none_p, none_m), (none_k, top_p, none_m), (none_k, none_p, min_p)):
        _check_kept(filter_thresholds(logits, temperature, *args), scaled, *args)
    # ties: values 0..9, each 300 times (small case); top_k = 450 cuts the run of 8s
    tied = (torch.arange(vocab, device=device) % 10).float()[None, :].repeat(2, 1)
    one = torch.ones(2, device=device)
    k450 = torch.full((2,), 450, dtype=torch.int32, device=device)
    thr = filter_thresholds(tied, one, k450, torch.ones(2, device=device), torch.zeros(2, device=device))
    assert thr.tolist() == [8.0, 8.0] if not big else thr.tolist() == [9.0, 9.0]
    # greedy rows are not filtered
    thr = filter_thresholds(logits[:2], torch.zeros(2, device=device), top_k[:2] + 1, top_p[:2], min_p[:2])
    assert torch.isinf(thr).all() and (thr < 0).all()


def test_same_names_signatures_and_docstrings():
    """The Triton module is a drop-in twin of the reference (get_ops picks one by device)."""
    import inspect

    from hybridserve.ops.reference import sampling as S

    assert set(R.__all__) <= set(K.__all__)
    for name in [*R.__all__, "sample_tokens"]:
        ref = getattr(R, name, None) or getattr(S, name)
        fast = getattr(K, name)
        assert inspect.signature(fast) == inspect.signature(ref), name
        assert inspect.getdoc(fast) == inspect.getdoc(ref), name


@pytest.mark.parametrize("vocab", [37, 5000])
def test_apply_token_bitmask(device, big, vocab):
    """Structured outputs: the grammar rows (not in order, not all rows) get exactly the reference's -inf."""
    from hybridserve.ops.reference import sampling as S

    rows, vocab = (64, 131072) if big and vocab > 37 else (7, vocab)
    words = (vocab + 31) // 32
    logits = torch.randn(rows, vocab, device=device)
    grammar_rows = torch.tensor([r for r in range(rows) if r % 3 != 1][::-1], device=device)
    masks = torch.randint(-(2**31), 2**31, (len(grammar_rows), words), dtype=torch.int64).to(torch.int32).to(device)
    masks[0] = 0  # a row that allows nothing
    want = logits.clone()
    S.apply_token_bitmask(want, grammar_rows, masks)
    got = logits.clone()
    K.apply_token_bitmask(got, grammar_rows, masks)
    assert torch.equal(got, want)
    assert torch.isinf(got[grammar_rows[0]]).all() and torch.equal(got[1], logits[1])
