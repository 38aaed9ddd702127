"""FP8 (e4m3) quantization and the FP8 projection.

float8_e4m3fn holds ±448 at most, with 3 mantissa bits. A tensor is stored as q = sat(x / s) with a
float32 scale s (x ≈ float(q) * s; sat clamps to ±448): one s per tensor (static: calibrated
offline, ModelOpt's input_scale) or one per row (dynamic: amax(|row|) / 448 at run time). An FP8
projection quantizes its input that way and multiplies e4m3 by e4m3 with float32 accumulation
(the weight carries its own scale, per tensor or per output channel).

Triton:
- `quantize_fp8`: one program per row (dynamic: amax pass, then the scaled cast; static: the cast).
- `fp8_linear` runs one of two GEMMs, picked per shape by `_backend`: `torch._scaled_mm` (cuBLASLt /
  CUTLASS; needs K and N multiples of 16 and a 16-bit output, tensorwise or rowwise scales) after
  `quantize_fp8`, or `_fp8_gemm_kernel`, a tiled Triton GEMM that quantizes a static-scale input
  inside its loads (no separate pass) and applies both scales in the epilogue. `GEMM_TUNE` holds the
  choice and the Triton tiles per token count; `bench/ops.py --only fp8` times both per model shape.
- `_quantize_tile` / `_scale_tile` are shared with the FP8 fused MoE.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12


@triton.jit
def _quantize_tile(x, scale):
    """x (any float tile) / scale, rounded to nearest and saturated, as e4m3."""
    q = tl.math.div_rn(x.to(tl.float32), scale)
    return tl.minimum(tl.maximum(q, -448.0), 448.0).to(tl.float8e4nv)


@triton.jit
def _scale_tile(acc, a_scale_ptr, a_rows, a_scale_stride, w_scale_ptr, cols, w_scale_stride, mask_rows, mask_cols):
    """acc [M, N] float32 times the input scale of each row (stride 0: one for all) and the weight
    scale of each column (stride 0: one for all), in that order."""
    sa = tl.load(a_scale_ptr + a_rows * a_scale_stride, mask=mask_rows, other=0.0)
    sw = tl.load(w_scale_ptr + cols * w_scale_stride, mask=mask_cols, other=0.0)
    return acc * sa[:, None] * sw[None, :]


@triton.jit(do_not_specialize=["T"])
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, T, K, stride_x, stride_q, STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(scale_ptr)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), 1e-12)
        tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        m = k0 + ks < K
        x = tl.load(x_row + k0 + ks, mask=m, other=0.0)
        tl.store(q_ptr + row * stride_q + k0 + ks, _quantize_tile(x, scale), mask=m)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] float. scale: [] float32 (static), or None: one per row, amax(|x[t]|) / 448 (dynamic).

    Returns (q [T, K] float8_e4m3fn, scale [] or [T] float32) with x ≈ float(q) * scale, q = x / scale
    rounded to nearest and saturated at ±448.
    """
    assert x.dim() == 2 and x.stride(1) == 1
    t, k = x.shape
    q = torch.empty((t, k), dtype=FP8_DTYPE, device=x.device)
    if scale is None:
        scale = torch.empty(t, dtype=torch.float32, device=x.device)
        static = False
    else:
        assert scale.numel() == 1 and scale.dtype == torch.float32
        static = True
    if t:
        block = min(triton.next_power_of_2(k), 4096)
        _quantize_kernel[(t,)](x, q, scale, t, k, x.stride(0), q.stride(0), STATIC=static, BLOCK=block,
                               num_warps=4 if block >= 1024 else 1)
    return q, scale


@triton.jit(do_not_specialize=["M"])  # the token count varies per step: no recompile per value
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K,
    stride_am, stride_wn, stride_om, a_scale_stride, w_scale_stride,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, N] = (a W^T) * a_scale * w_scale. a: e4m3 [M, K], or any float [M, K] quantized here with
    the static scalar a_scale; W: e4m3 [N, K]. Program = (N block, M block), N-major so the programs
    sharing a weight tile run together."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, nmask = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    if a_ptr.dtype.element_ty != tl.float8e4nv:
        a_scale = tl.load(a_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (ks < K - k0) | EVEN_K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if a_ptr.dtype.element_ty != tl.float8e4nv:
            a = _quantize_tile(a, a_scale)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _scale_tile(acc, a_scale_ptr, rows, a_scale_stride, w_scale_ptr, cols, w_scale_stride, rmask, nmask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


# Per token count (first entry whose max_tokens >= T): which GEMM runs ("scaled_mm" where it is
# legal, else the Triton kernel) and the Triton kernel's tiles. Initial choices, not measured yet:
# bench/ops.py --only fp8 times both backends and the tiles at every model shape.
GEMM_TUNE = [
    dict(max_tokens=16, backend="scaled_mm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
    dict(max_tokens=128, backend="scaled_mm", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(max_tokens=None, backend="scaled_mm", BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
]


def gemm_config(num_tokens: int) -> dict:
    return next(c for c in GEMM_TUNE if c["max_tokens"] is None or num_tokens <= c["max_tokens"])


@functools.cache
def _has_fp8_mma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._scaled_mm's requirements: Ada / Hopper or newer, K and N multiples of 16, 16-bit output."""
    n, k = weight.shape
    return _has_fp8_mma(x.device) and k % 16 == 0 and n % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16)


def _fp8_linear(x, weight, weight_scale, input_scale, cfg: dict, backend: str) -> torch.Tensor:
    """fp8_linear with a given GEMM (backend: "scaled_mm" or "triton") and Triton tile config."""
    t, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.dtype == FP8_DTYPE and weight.stride(1) == 1 and x.stride(1) == 1
    assert weight_scale.dtype == torch.float32 and weight_scale.numel() in (1, n)
    if t == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    if backend == "scaled_mm":
        q, s = quantize_fp8(x, input_scale)
        if s.numel() == 1 and weight_scale.numel() == 1:  # tensorwise
            return torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=weight_scale, out_dtype=x.dtype)
        scale_a = s.reshape(t, 1) if s.dim() else s.expand(t, 1).contiguous()
        scale_b = weight_scale.reshape(1, n) if weight_scale.dim() else weight_scale.expand(1, n).contiguous()
        return torch._scaled_mm(q, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16).to(x.dtype)
    if input_scale is None:
        a, a_scale = quantize_fp8(x)
    else:
        a, a_scale = x, input_scale
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    _fp8_gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(t, bm))](
        a, a_scale, weight, weight_scale, out, t, n, k, a.stride(0), weight.stride(0), out.stride(0),
        1 if a_scale.dim() else 0, 1 if weight_scale.dim() else 0,
        EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T with W in e4m3. x: [T, K] float; weight: [N, K] float8_e4m3fn; weight_scale: [] or
    [N] float32 (per tensor / per output channel); input_scale: [] float32 (static) or None (per token).

    Returns [T, N] in x's dtype: x quantized as quantize_fp8 does, e4m3 products accumulated in
    float32, times both scales, rounded once.
    """
    cfg = gemm_config(x.shape[0])
    backend = cfg["backend"] if cfg["backend"] != "scaled_mm" or _scaled_mm_ok(x, weight) else "triton"
    return _fp8_linear(x, weight, weight_scale, input_scale, cfg, backend)
