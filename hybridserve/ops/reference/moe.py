"""Sigmoid-routed mixture of non-gated squared-ReLU experts.

Routing (float32): score = sigmoid(logits); choose top-k on score + correction bias; weight with
the *unbiased* score, renormalise, multiply by the routed scaling factor. Expert e computes
down_e(relu(up_e(x))^2). The shared expert is added by the model layer, not here.
"""

from __future__ import annotations

import torch

from hybridserve.ops.reference.fp8 import fp8_linear


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
    scores = torch.sigmoid(router_logits.float())
    ids = torch.topk(scores + correction_bias.float(), top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


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
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        pick = (flat_ids == e).nonzero(as_tuple=True)[0]
        rows = token_of[pick]
        if w_up_scale is None:
            h = torch.relu(x[rows] @ w_up[e].t()).square()
            y = h @ w_down[e].t()
        else:
            h = torch.relu(fp8_linear(x[rows], w_up[e], w_up_scale[e], a_up_scale)).square()
            y = fp8_linear(h, w_down[e], w_down_scale[e], a_down_scale)
        out.index_add_(0, rows, y.float() * topk_weights.reshape(-1)[pick, None])
    return out.to(x.dtype)
