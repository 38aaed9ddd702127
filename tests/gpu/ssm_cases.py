"""The Mamba SSM kernels (decode state update, fused decode step, chunked SSD prefill, stochastic
rounding of a 16-bit state) against their reference twins; shared by tests/gpu and tests/ops_interp
like kernel_cases.py, whose tolerance rule (`check`) they use.

A 16-bit state written with stochastic rounding is compared bit for bit: the random bits are the
same hash in both, so the kernel's state may differ from the reference's only where its float32
update differs in the last bit and that bit decides the rounding (rare, and then by one unit).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_cases import DTYPES, check, f32, packed

from hybridserve.ops import reference as R
from hybridserve.ops import triton as K  # noqa: N812
from hybridserve.ops.reference.rounding import round_state
from hybridserve.ops.reference.ssd import ssd_recurrent
from hybridserve.ops.triton import ssd as KS
from hybridserve.ops.triton.rounding import _round_stochastic

SEED = 12345  # a state_seed for the stochastic-rounding cases


def _ssm_dims(big):
    return (64, 64, 8, 128) if big else (4, 16, 2, 16)  # H, P, G, N


def _ssm_params(device, h):
    A_log = torch.randn(h, device=device) * 0.5  # A = -exp(A_log)
    D = torch.randn(h, device=device)
    dt_bias = torch.randn(h, device=device) * 0.5 - 1.0
    return A_log, D, dt_bias


def _states(*dtypes):
    """(state dtype, state_seed) cases: each dtype rounded to nearest, 16-bit ones also stochastically."""
    cases = [pytest.param(d, None, id=str(d)[6:]) for d in dtypes]
    return cases + [pytest.param(d, SEED, id=f"{str(d)[6:]}-sr") for d in dtypes if d != torch.float32]


def assert_same_rounding(s_k, s_r, what):
    """A 16-bit state written by the kernel and by the reference with the same random bits: equal
    but for a few elements, which are one unit apart (the float32 update differed in the last bit)."""
    assert s_k.dtype == s_r.dtype and s_k.dtype in (torch.bfloat16, torch.float16)
    diff = s_k != s_r
    assert diff.float().mean().item() <= 1e-3, f"{what}: {diff.float().mean().item():.2%} of the state differs"
    a, b = s_k[diff].float(), s_r[diff].float()
    unit = 2.0 ** (-7 if s_k.dtype == torch.bfloat16 else -10)
    assert ((a - b).abs() <= unit * torch.maximum(a.abs(), b.abs())).all(), f"{what}: more than one unit apart"


# ----------------------------------------------------------------------------- stochastic rounding


@triton.jit
def _round_test_kernel(x_ptr, bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=0.0)
    bits = tl.load(bits_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, _round_stochastic(x, bits, out_ptr.dtype.element_ty), mask=m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 overflow
def test_stochastic_rounding_bits_match_reference(device, dtype):
    """The kernel's rounding of given float32 values with given random bits is the reference's,
    bit for bit (NaN as NaN): ordinary values of both signs, values already on the 16-bit grid, float16
    subnormals and overflow, infinities and NaN."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1 + 2**-12, info.max, -info.max, 70000.0, -1e6, 3e-8, -5e-7,
                            1e-30, float("inf"), -float("inf"), float("nan")], device=device)
    x = torch.cat([torch.randn(4000, device=device) * 10.0 ** torch.randint(-6, 4, (4000,), device=device), special])
    noise = torch.randint(0, 2**32, x.shape, device=device, dtype=torch.int64)
    out = torch.empty(x.shape, dtype=dtype, device=device)
    bits = torch.where(noise >= 2**31, noise - 2**32, noise).to(torch.int32)
    _round_test_kernel[(triton.cdiv(x.numel(), 1024),)](x, bits, out, x.numel(), BLOCK=1024)
    ref, out = round_state(x.cpu(), dtype, noise.cpu()), out.cpu()
    nan = ref.isnan()  # NaN stays NaN; its payload is the hardware's (CUDA's float16 NaN is 0x7FFF)
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), ref[~nan].view(torch.int16))


# ------------------------------------------------------------------------------------------- ssd

# the prefill kernels: the chunked scan at its launch shape and at a small one (many later chunks,
# several row tiles and column blocks per chunk), and the previous one-pass kernel
SSD_VARIANTS = {
    "chunked": ({}, K.ssd_varlen),
    "chunked-small": (dict(CHUNK=32, BLOCK_T=16, SCAN_BLOCK_M=16, SCAN_BLOCK_K=16), K.ssd_varlen),
    "one-pass": ({}, KS.ssd_varlen_one_pass),
}


@pytest.fixture(params=list(SSD_VARIANTS))
def ssd_impl(request, monkeypatch):
    tune, fn = SSD_VARIANTS[request.param]
    for k, v in tune.items():
        monkeypatch.setitem(KS.SSD_TUNE, k, v)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("state_dtype", "seed"), _states(torch.float32, torch.bfloat16))
def test_ssd_varlen(device, big, dtype, state_dtype, seed, ssd_impl):
    h, p, g, n = _ssm_dims(big)
    chunk = 128 if big else 16
    lens = [1, 64, 65, 130, 3] if not big else [1, 127, 129, 600, 2]
    nseq = len(lens)
    t = sum(lens)
    cu = packed(lens, device)
    slots = torch.randperm(nseq + 2, device=device)[:nseq]
    init = torch.tensor([True, False, True, True, False], device=device)
    # sequences with state continue at assorted positions, fresh ones start at 0
    seq_lens = torch.tensor([n_ + (7 * i + 3 if i_init else 0) for i, (n_, i_init) in enumerate(zip(lens, init.tolist()))],
                            dtype=torch.int32, device=device)
    A_log, D, dt_bias = _ssm_params(device, h)
    x = torch.randn(t, h, p, device=device).to(dtype)
    dt_raw = torch.randn(t, h, device=device).to(dtype)
    bc = torch.randn(t, 2, g, n, device=device).to(dtype)
    B, C = bc[:, 0], bc[:, 1]  # strided views
    state = (torch.randn(nseq + 2, h, p, n, device=device) * 0.5).to(state_dtype)
    s_k, s_r, s_g = state.clone(), state.clone(), state.float()
    y_k = ssd_impl(x, dt_raw, A_log, B, C, D, dt_bias, cu, seq_lens, s_k, slots, init, chunk, seed)
    y_r = R.ssd_varlen(x, dt_raw, A_log, B, C, D, dt_bias, cu, seq_lens, s_r, slots, init, chunk, seed)
    y_g = R.ssd_varlen(*f32(x, dt_raw), A_log, *f32(B, C), D, dt_bias, cu, seq_lens, s_g, slots, init, chunk)
    check(y_k, y_r, y_g, dtype, "ssd y")
    check(s_k, s_r, s_g, state_dtype if dtype == torch.float32 else dtype, "ssd state")
    if seed is not None and dtype == torch.float32:  # exact float32 dots: the same rounding decisions
        assert_same_rounding(s_k, s_r, "ssd state")
    # untouched slots stay bit-identical
    used = torch.zeros(nseq + 2, dtype=torch.bool, device=device)
    used[slots] = True
    assert torch.equal(s_k[~used], state[~used])


def test_ssd_matches_recurrence(device, big, ssd_impl):
    """The chunked kernel against the token-by-token oracle, on one sequence over several chunks."""
    h, p, g, n = _ssm_dims(False)
    length = 150
    A_log, D, dt_bias = _ssm_params(device, h)
    x = torch.randn(length, h, p, device=device)
    dt_raw = torch.randn(length, h, device=device)
    B, C = torch.randn(length, g, n, device=device), torch.randn(length, g, n, device=device)
    state0 = torch.randn(1, h, p, n, device=device)
    s_k = state0.clone()
    one = torch.ones(1, dtype=torch.bool, device=device)
    lens = torch.full((1,), length + 9, dtype=torch.int32, device=device)
    y_k = ssd_impl(x, dt_raw, A_log, B, C, D, dt_bias, packed([length], device), lens, s_k,
                   torch.zeros(1, dtype=torch.int64, device=device), one, 16)
    y_o, s_o = ssd_recurrent(x, dt_raw, A_log, B, C, D, dt_bias, state0[0])
    torch.testing.assert_close(y_k, y_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_k[0], s_o, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("state_dtype", "seed"), _states(torch.float32, torch.bfloat16, torch.float16))
def test_selective_state_update(device, big, dtype, state_dtype, seed):
    h, p, g, n = _ssm_dims(big)
    nb = 5
    A_log, D, dt_bias = _ssm_params(device, h)
    slots = torch.randperm(nb + 3, device=device)[:nb]
    seq_lens = torch.tensor([1, 2, 3, 7, 40], dtype=torch.int32, device=device)
    state = (torch.randn(nb + 3, h, p, n, device=device) * 0.5).to(state_dtype)
    s_k, s_r, s_g = state.clone(), state.clone(), state.float()
    for _ in range(2):
        conv_out = torch.randn(nb, h * p + 2 * g * n, device=device).to(dtype)  # x | B | C, as sliced
        x = conv_out[:, : h * p].view(nb, h, p)
        B = conv_out[:, h * p : h * p + g * n].view(nb, g, n)
        C = conv_out[:, h * p + g * n :].view(nb, g, n)
        dt_raw = torch.randn(nb, h, device=device).to(dtype)
        y_k = K.selective_state_update(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, s_k, slots, seed)
        y_r = R.selective_state_update(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, s_r, slots, seed)
        y_g = R.selective_state_update(*f32(x, dt_raw), A_log, *f32(B, C), D, dt_bias, seq_lens, s_g, slots)
        check(y_k, y_r, y_g, dtype, "ssu y")
        worst = state_dtype if state_dtype != torch.float32 else dtype
        check(s_k, s_r, s_g, worst, "ssu state")
        if seed is not None:
            assert_same_rounding(s_k, s_r, "ssu state")
            s_k.copy_(s_r)  # the next step starts from the same state
        seq_lens = seq_lens + 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("state_dtype", "seed"), _states(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("with_bias", [True, False])
def test_mamba_decode_step(device, big, dtype, state_dtype, seed, with_bias):
    """The fused conv update + state update against the two reference ops, over several steps, so a
    ring row written too early (read by another program of the same step) shows up in y."""
    h, p, g, n = _ssm_dims(big)
    nb, kw, c = 5, 4, h * p + 2 * g * n
    A_log, D, dt_bias = _ssm_params(device, h)
    slots = torch.randperm(nb + 3, device=device)[:nb]
    ssm = (torch.randn(nb + 3, h, p, n, device=device) * 0.5).to(state_dtype)
    conv = torch.randn(nb + 3, kw, c, device=device).to(dtype)
    w = (torch.randn(c, kw, device=device) * 0.5).to(dtype)
    bias = torch.randn(c, device=device).to(dtype) if with_bias else None
    seq_lens = torch.tensor([1, 2, 3, 7, 40][:nb], dtype=torch.int32, device=device)
    st_k, st_r, st_g = (ssm.clone(), conv.clone()), (ssm.clone(), conv.clone()), (ssm.float(), conv.float())
    for _ in range(3):
        proj = torch.randn(nb, c + h + 9, device=device).to(dtype)
        xbc, dt_raw = proj[:, :c], proj[:, c : c + h]  # strided views, as split from in_proj's output
        y_k = K.mamba_decode_step(xbc, dt_raw, w, bias, A_log, D, dt_bias, seq_lens, st_k[1], st_k[0], slots, seed)
        y_r = R.mamba_decode_step(xbc, dt_raw, w, bias, A_log, D, dt_bias, seq_lens, st_r[1], st_r[0], slots, seed)
        y_g = R.mamba_decode_step(*f32(xbc, dt_raw, w, bias), A_log, D, dt_bias, seq_lens, st_g[1], st_g[0], slots)
        check(y_k, y_r, y_g, dtype, "fused step y")
        worst = state_dtype if state_dtype != torch.float32 else dtype
        check(st_k[0], st_r[0], st_g[0], worst, "fused step ssm state")
        torch.testing.assert_close(st_k[1], st_r[1], rtol=0, atol=0)  # raw rows, copied
        if seed is not None:
            assert_same_rounding(st_k[0], st_r[0], "fused step ssm state")
            st_k[0].copy_(st_r[0])
        seq_lens = seq_lens + 1

