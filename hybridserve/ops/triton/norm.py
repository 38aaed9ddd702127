"""RMSNorm with optional fused residual add, and the Mamba output's gated RMSNorm in groups.

Math in float32, result cast back to the input dtype *before* the weight multiply (as the model's
reference implementation does).

Triton: one program per row (rms_norm) or per (row, group) (gated_rms_norm); the row lives in
registers, so x (and the residual) are read once and every output written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n, stride_x, stride_res, stride_out, stride_res_out, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # the sum is rounded to the model dtype, as `x + residual` is in the reference
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rms_norm_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr,
    group_size, stride_y, stride_z, stride_out, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    u = y * z * tl.sigmoid(z)
    rstd = tl.rsqrt(tl.sum(u * u, axis=0) / group_size + eps)
    normed = (u * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the residual (if any), then normalise.

    x: [T, hidden] model dtype; weight: [hidden]; residual: [T, hidden] or None.
    Returns (normed [T, hidden], new_residual [T, hidden]) where new_residual = x + residual
    (or x itself when residual is None), both in x's dtype. Nothing is updated in place.
    """
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, hidden] with contiguous rows"
    t, n = x.shape
    assert weight.shape == (n,) and weight.is_contiguous()
    out = torch.empty((t, n), dtype=torch.result_type(weight, x), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1 and residual.dtype == x.dtype
        new_res = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        residual, new_res = x, x
    if t == 0:
        return out, new_res
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t,)](
        x, residual, weight, out, new_res,
        n, x.stride(0), residual.stride(0), out.stride(0), new_res.stride(0), eps,
        HAS_RES=residual is not x, BLOCK=block, num_warps=_warps(block),
    )
    return out, new_res


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """RMSNorm(y * silu(z)) over groups of `group_size` channels (gate before the norm).

    y, z: [T, d] (d a multiple of group_size); weight: [d]. Returns [T, d] in y's dtype.
    """
    assert y.dim() == 2 and y.shape == z.shape and y.stride(-1) == 1 and z.stride(-1) == 1
    t, d = y.shape
    assert d % group_size == 0 and weight.shape == (d,) and weight.is_contiguous()
    out = torch.empty((t, d), dtype=torch.result_type(weight, y), device=y.device)
    if t == 0:
        return out
    block = triton.next_power_of_2(group_size)
    _gated_rms_norm_kernel[(t, d // group_size)](
        y, z, weight, out, group_size, y.stride(0), z.stride(0), out.stride(0), eps,
        BLOCK=block, num_warps=_warps(block),
    )
    return out
