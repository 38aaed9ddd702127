"""Causal attention without positional encoding over paged KV, for prefill chunks and decode.

GQA: query head i uses kv head i // (H / Hkv). The KV cache of one attention layer is
[2, NB, BS, Hkv, D]: a token at position p of a sequence lives at page block_table[p // BS],
offset p % BS. New tokens' K/V are stored first, then each sequence's queries attend to all its
tokens up to their own position (earlier steps' tokens included).

An FP8 cache (float8_e4m3fn) stores k / k_scale and v / v_scale (saturated at ±448) with one float32
scale per layer each (`kv_scale` = [k_scale, v_scale]); attention reads them back times the scale.
"""

from __future__ import annotations

import torch

from hybridserve.ops.reference.fp8 import FP8_DTYPE, FP8_MAX


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D]; kv_cache: [2, NB, BS, Hkv, D] updated in place; slot_mapping: [T] int64
    flat slots (page * BS + offset); negative slots are skipped (padding). kv_scale: [2] float32
    (k, v) scales of a float8_e4m3fn cache (required then, else None)."""
    assert (kv_scale is not None) == (kv_cache.dtype == FP8_DTYPE), "kv_scale goes with an fp8 cache"
    keep = slot_mapping >= 0
    for i, x in enumerate((k, v)):
        x = x[keep]
        if kv_scale is not None:
            x = (x.float() / kv_scale[i]).clamp(-FP8_MAX, FP8_MAX)
        kv_cache[i].view(-1, *kv_cache.shape[-2:])[slot_mapping[keep]] = x.to(kv_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, H, D] the new tokens' queries; kv_cache: [2, NB, BS, Hkv, D] (already holding the new
    tokens); block_tables: [B, M] int32; cu_seqlens: [B+1] int32 (new tokens per sequence);
    seq_lens: [B] int32 (cached + new); kv_scale: [2] float32 (k, v) scales of a float8_e4m3fn
    cache (required then, else None). Returns [T, H, D] in q's dtype (softmax in float32)."""
    assert (kv_scale is not None) == (kv_cache.dtype == FP8_DTYPE), "kv_scale goes with an fp8 cache"
    k_scale, v_scale = (1.0, 1.0) if kv_scale is None else kv_scale.float()
    out = torch.empty_like(q)
    bs = kv_cache.shape[2]
    h, hkv = q.shape[1], kv_cache.shape[3]
    cu = cu_seqlens.tolist()
    for b, total in enumerate(seq_lens.tolist()):
        s, e = cu[b], cu[b + 1]
        pos = torch.arange(total, device=q.device)
        pages = block_tables[b].long()[pos // bs]
        k = (kv_cache[0][pages, pos % bs].float() * k_scale).repeat_interleave(h // hkv, dim=1)  # [L, H, D]
        v = (kv_cache[1][pages, pos % bs].float() * v_scale).repeat_interleave(h // hkv, dim=1)
        qpos = torch.arange(total - (e - s), total, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        scores = scores.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
