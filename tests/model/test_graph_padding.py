"""A step padded as a prefill CUDA graph runs it (a padding sequence on the spare slot and block,
empty sequences up to MAX_SEQS) gives the eager step's logits and leaves every live slot and KV page
as the eager step does, through the reference ops (tests/ops_interp and tests/gpu run the same
steps with the Triton kernels). The capture itself needs a GPU: tests/engine/test_engine_gpu.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))

from model_cases import assert_padding_changes_nothing, run_padded_steps  # noqa: E402

from hybridserve.config import ModelConfig  # noqa: E402
from hybridserve.engine.cuda_graphs import MAX_SEQS, PrefillGraphs, prefill_families, prefill_sizes  # noqa: E402
from hybridserve.engine.step_plan import synthetic_plan  # noqa: E402
from hybridserve.model.forward_batch import ForwardBatch  # noqa: E402
from hybridserve.model.nemotron_h import NemotronHForCausalLM  # noqa: E402
from hybridserve.ops import reference  # noqa: E402


def test_padded_steps_match_eager_steps_reference_ops():
    model = NemotronHForCausalLM(ModelConfig.from_hf("tiny"), torch.float32)
    model.init_random(seed=3)
    eager, padded, cache_e, cache_p = run_padded_steps(model, reference, torch.float32, "cpu")
    assert_padding_changes_nothing(eager, padded, cache_e, cache_p, tol=1e-5)


def test_prefill_graph_sizes_and_which_steps_fit():
    assert prefill_sizes(0) == prefill_sizes(63) == [] and prefill_sizes(64) == [64] and prefill_sizes(100) == [64, 100]
    sizes = prefill_sizes(2048)
    assert sizes[:8] == list(range(64, 513, 64)) and sizes[-1] == 2048 and len(sizes) == 16
    assert prefill_sizes(2000)[-2:] == [1792, 2000]  # the limit itself is always captured
    assert all((b - a) / b <= 1 / 5 for a, b in zip(sizes[7:], sizes[8:]))  # padding past 512: at most 1/5
    graphs = PrefillGraphs(prefill_sizes(1024), MAX_SEQS, 4, 16, pad_slot=40, pad_block=90, device="cpu")

    def plan(lengths, samples=None, captures=()):
        p = synthetic_plan([[1] * n for n in lengths], [0] * len(lengths), list(range(len(lengths))),
                           [[0]] * len(lengths), sample_token_indices=list(range(samples or len(lengths))))
        p.captures = np.array(captures, dtype=np.int64).reshape(-1, 3)
        return p

    assert graphs.fits(plan([300, 200, 1]))
    assert graphs.fits(plan([1] * MAX_SEQS))  # as many sequences as the graphs have, plus the padding one
    assert not graphs.fits(plan([1] * (MAX_SEQS + 1)))
    assert not graphs.fits(plan([1000, 25]))  # more tokens than the largest graph
    assert not graphs.fits(plan([40], samples=MAX_SEQS + 1))  # more logits rows (prompt logprobs) than it returns
    assert not graphs.fits(plan([300], captures=[(0, 41, 16)]))  # a snapshot inside the chunk: eager
    assert graphs.block_tables.shape[1] == 1024 // 16  # the padding sequence may be longer than max_model_len


def test_prefill_families_cover_the_mixed_steps_of_big_decode_batches():
    families = prefill_families(2048, 1024, 1024)
    assert [seqs for seqs, _ in families] == [MAX_SEQS, 128, 256, 512, 1024]
    assert families[0][1] == prefill_sizes(2048)
    assert dict(families)[1024] == [1280, 1536, 1792, 2048]  # 1,024 decodes + a 1,024-token chunk
    assert dict(families)[128] == [256, 512, 768, 1024, 1152]
    for seqs, sizes in families[1:]:
        assert sizes[0] > seqs and sizes[-1] == min(2048, seqs + 1024) and sizes == sorted(set(sizes))
    assert [s for s, _ in prefill_families(2048, 190, 1024)] == [MAX_SEQS, 128, 190]  # the largest batch itself
    assert prefill_families(2048, 2048, 1024)[-1][0] == 1024  # 2,048 sequences need more than 2,048 tokens
    assert prefill_families(2048, 24, 1024) == [(MAX_SEQS, prefill_sizes(2048))]  # no batch past the narrow one
    assert prefill_families(200, 48, 1024) == [(MAX_SEQS, prefill_sizes(200)), (48, [200])]
    assert prefill_families(0, 1024, 1024) == []  # --max-prefill-graph-tokens 0

    def plan(lengths):
        return synthetic_plan([[1] * n for n in lengths], [0] * len(lengths), list(range(len(lengths))),
                              [[0]] * len(lengths), sample_token_indices=list(range(len(lengths))))

    wide = PrefillGraphs(dict(families)[256], 256, 4, 16, pad_slot=300, pad_block=900, device="cpu")
    assert wide.fits(plan([1] * 200 + [1024])) and not wide.fits(plan([1] * 256 + [1024]))
    assert not wide.fits(plan([1] * 100 + [1200]))  # 1,300 tokens: past this family's largest graph
    assert wide.padded(ForwardBatch.build([[1]] * 200 + [[2] * 60], [5] * 200 + [0], list(range(201)),
                                          [[0, 1, 2, 3]] * 201, 16)).input_ids.shape == (512,)


@pytest.mark.parametrize("tokens", [1, 63, 64])
def test_padding_fills_the_rest_of_the_graph(tokens):
    """Padding up to the graph's size: one padding sequence owns the spare tokens, on the spare
    slot, without state, its tokens on the spare block's entries; the sequences after it are empty."""
    graphs = PrefillGraphs(prefill_sizes(128), MAX_SEQS, 4, 4, pad_slot=9, pad_block=30, device="cpu")
    lens = [tokens - tokens // 2, tokens // 2] if tokens > 1 else [1]
    lens = [n for n in lens if n]
    batch = ForwardBatch.build([[5] * n for n in lens], [3] * len(lens), [2, 6][: len(lens)],
                               [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]] * len(lens), 4)
    p = graphs.padded(batch)
    b = len(lens)
    assert p.input_ids.shape == (64,) and p.seq_lens.shape == (MAX_SEQS + 1,)
    assert p.cu_seqlens[: b + 1].tolist() == batch.cu_seqlens.tolist()
    assert (p.cu_seqlens[b + 1 :] == 64).all() and p.seq_lens[b] == 64 - tokens and (p.seq_lens[b + 1 :] == 0).all()
    assert (p.state_slots[b:] == 9).all() and not p.has_initial_state[b:].any() and p.has_initial_state[:b].all()
    assert p.slot_mapping[tokens:].tolist() == [30 * 4 + i % 4 for i in range(64 - tokens)]
    assert (p.block_tables[b:] == 30).all() and (p.block_tables[:b, :17] == batch.block_tables).all()
    assert p.logits_indices[:b].tolist() == batch.logits_indices.tolist() and (p.logits_indices[b:] == 0).all()
