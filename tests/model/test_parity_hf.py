"""Our NemotronH forward pass equals transformers' NemotronHForCausalLM on random small models
(every parameter random, correction bias included), several layer patterns and lengths."""

from __future__ import annotations

import pytest
import torch
from model_helpers import hf_model, logits_of, ours_from_hf, tiny_config

PATTERNS = ["M*E-", "MEM*EM-*E", "**MM--EE"]
LENGTHS = [1, 5, 17, 29]  # chunk_size 8: 17 and 29 cross several SSD chunks


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids]), use_cache=False).logits[0].float()


def _ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fp32_logits_match_transformers(pattern):
    raw = tiny_config(pattern)
    hf = hf_model(raw, torch.float32, seed=len(pattern))
    ours = ours_from_hf(hf, raw, torch.float32)
    for length in LENGTHS:
        ids = _ids(length, seed=length)
        torch.testing.assert_close(logits_of(ours, ids), _hf_logits(hf, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bf16_logits_match_transformers(pattern):
    raw = tiny_config(pattern)
    hf = hf_model(raw, torch.bfloat16, seed=len(pattern))
    # Well-separated correction biases fix the expert choice: a near-tie flipped by bf16 rounding
    # would swap whole experts (the fp32 test covers token-dependent selection).
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randperm(buf.numel(), generator=torch.Generator().manual_seed(1)).float())
    ours = ours_from_hf(hf, raw, torch.bfloat16)
    moe = ours.backbone.layers[pattern.index("E")].mixer
    assert moe.gate.weight.dtype == moe.gate.e_score_correction_bias.dtype == torch.float32
    for length in LENGTHS:
        ids = _ids(length, seed=length)
        out, ref = logits_of(ours, ids), _hf_logits(hf, ids)
        torch.testing.assert_close(out, ref, atol=0.25, rtol=0.05)
        assert (out - ref).abs().mean() < 0.03
