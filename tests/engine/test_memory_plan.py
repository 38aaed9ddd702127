"""The start-up memory plan's arithmetic, the decode-graph capture sizes, and the chunked sampler
(bounded scratch memory) giving the same samples as one pass over all rows."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from hybridserve.engine.cuda_graphs import capture_sizes
from hybridserve.engine.memory_plan import MemoryPlan, fit_cache
from hybridserve.engine.step_plan import synthetic_plan
from tests.engine.test_sampler import row

SLOT, BLOCK, PER_SEQ_BLOCKS = 1000, 100, 8  # a sequence needs 1000 + 8 * 100 = 1800 bytes


def fit(budget, **kw):
    kw.setdefault("max_num_seqs", 64)
    return fit_cache(budget, slot_bytes=SLOT, block_bytes=BLOCK, max_blocks_per_seq=PER_SEQ_BLOCKS, **kw)


def test_fit_cache_gives_every_slot_a_full_context_of_kv_and_the_rest_to_blocks():
    pad = SLOT + BLOCK
    # memory for 10 full sequences: 10 slots, the rest (10 * 8 blocks) to KV
    assert fit(pad + 10 * 1800 + 50) == (10, 80)
    # max_num_seqs caps the slots; the memory they leave goes to KV blocks
    assert fit(pad + 10 * 1800, max_num_seqs=4) == (4, (10 * 1800 - 4 * SLOT) // BLOCK)
    # fixed blocks: the slots take what is left
    assert fit(pad + 5 * SLOT + 20 * BLOCK, fixed_blocks=20) == (5, 20)
    with pytest.raises(RuntimeError, match="not enough memory"):
        fit(pad + 1799)


def test_memory_plan_summary_names_every_part():
    plan = MemoryPlan(budget=80 << 30, in_use=62 << 30, weights=59 << 30, step_peak=1 << 30, sample_rows=186,
                      graphs=1 << 29, graph_batch=186, graph_tokens=2048, num_slots=186, slot_bytes=1 << 24, num_snapshots=32, num_blocks=1000,
                      block_bytes=1 << 22, max_num_seqs=1024, max_model_len=2064)
    text = plan.summary()
    for part in ("80.00 =", "weights 59.00", "other in use 3.00", "activations 1.00 (186 sample rows)",
                 "CUDA graphs 0.50 (decode batch <= 186, prefill <= 2048 tokens)", "(186 slots)",
                 "prefix-cache snapshots 0.50 (32)", "(1000 blocks)", "186 sequences", "max_num_seqs 1024"):
        assert part in text, part
    eager = dataclasses.replace(plan, graphs=0, graph_batch=0, graph_tokens=0).summary()
    assert "CUDA graphs" not in eager and "activations 1.00" in eager  # --enforce-eager: no graph reserve


def test_capture_sizes_fine_then_coarse_up_to_the_limit():
    assert capture_sizes(1) == [1] and capture_sizes(3) == [1, 2, 3]
    sizes = capture_sizes(1024)
    assert sizes[:6] == [1, 2, 4, 8, 16, 32] and sizes[-1] == 1024 and len(sizes) <= 40
    steps = {b - a for a, b in zip(sizes, sizes[1:]) if a >= 256}
    assert steps <= {32, 64}
    assert sizes == sorted(set(sizes))
    assert capture_sizes(1000)[-2:] == [960, 1000]  # the limit itself is always captured


def test_chunked_sampler_equals_one_pass(make_core):
    runner = make_core(max_num_seqs=4).runner
    rng = random.Random(3)
    rows = [row(seed=i, temperature=rng.choice([0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.8]), output=[4] * (i % 3),
                logprobs=rng.choice([None, 0, 3]), logit_bias={5: 4.0} if i % 4 == 0 else {},
                min_tokens=2 if i % 5 == 0 else 0, frequency_penalty=0.5 if i % 3 == 0 else 0.0)
            for i in range(11)]
    plan = synthetic_plan([[1] * 11], [0], [0], [[0]], sample_token_indices=list(range(11)), sample_rows=rows)
    logits = torch.randn(11, runner.model_config.vocab_size, generator=torch.Generator().manual_seed(0))
    whole = runner.sample(plan, logits.clone()).to_host()
    runner.sampler_chunk_rows = 3
    chunked = runner.sample(plan, logits.clone()).to_host()
    assert chunked == whole
    assert any(lp is not None for lp in whole[1]) and len(set(whole[0])) > 3
