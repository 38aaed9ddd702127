"""RMSNorm with optional fused residual add, and the Mamba output's gated RMSNorm in groups.

Math in float32, result cast back to the input dtype *before* the weight multiply (as the model's
reference implementation does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the residual (if any), then normalise.

    x: [T, hidden] model dtype; weight: [hidden]; residual: [T, hidden] or None.
    Returns (normed [T, hidden], new_residual [T, hidden]) where new_residual = x + residual
    (or x itself when residual is None), both in x's dtype. Nothing is updated in place.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """RMSNorm(y * silu(z)) over groups of `group_size` channels (gate before the norm).

    y, z: [T, d] (d a multiple of group_size); weight: [d]. Returns [T, d] in y's dtype.
    """
    t, d = y.shape
    u = y.float() * F.silu(z.float())
    u = u.view(t, d // group_size, group_size)
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
    return weight * u.view(t, d).to(y.dtype)
