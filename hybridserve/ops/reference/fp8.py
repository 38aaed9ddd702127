"""FP8 (e4m3) quantization and the FP8 projection.

float8_e4m3fn holds ±448 at most, with 3 mantissa bits. A tensor is stored as q = sat(x / s) with a
float32 scale s (x ≈ float(q) * s; sat clamps to ±448): one s per tensor (static: calibrated
offline, ModelOpt's input_scale) or one per row (dynamic: amax(|row|) / 448 at run time). An FP8
projection quantizes its input that way and multiplies e4m3 by e4m3 with float32 accumulation
(the weight carries its own scale, per tensor or per output channel).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row still gets a usable scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] float. scale: [] float32 (static), or None: one per row, amax(|x[t]|) / 448 (dynamic).

    Returns (q [T, K] float8_e4m3fn, scale [] or [T] float32) with x ≈ float(q) * scale, q = x / scale
    rounded to nearest and saturated at ±448.
    """
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=-1)
        # a tensor divisor: CUDA divides by a Python number as a product with its rounded reciprocal,
        # a bit off the correctly rounded quotient the kernel computes
        scale = (amax / amax.new_tensor(FP8_MAX)).clamp_min(MIN_SCALE)
        div = scale[:, None]
    else:
        scale = scale.float()
        div = scale
    return (xf / div).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


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
    q, s = quantize_fp8(x, input_scale)
    acc = q.float() @ weight.float().t()
    row_scale = s[:, None] if s.dim() else s
    return (acc * row_scale * weight_scale.float()).to(x.dtype)
