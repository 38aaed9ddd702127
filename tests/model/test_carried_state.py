"""State carried between steps is exact: Mamba conv/SSM slots and paged KV give the same logits
as one full forward pass, however the tokens are split into steps or packed with others."""

from __future__ import annotations

import pytest
import torch
from model_helpers import logits_of, new_cache, randomize_, tiny_config

from hybridserve.config import ModelConfig
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.nemotron_h import NemotronHForCausalLM

BS = 4  # KV page size


@pytest.fixture(scope="module")
def model():
    m = NemotronHForCausalLM(ModelConfig.from_dict(tiny_config("MEM*EM-*E", chunk_size=8)), torch.float32)
    randomize_(m, seed=3)
    return m.eval()


def _ids(length, seed):
    return torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class Seq:
    """One sequence's bookkeeping: tokens so far, its state slot and (non-contiguous) KV pages."""

    def __init__(self, ids, slot, pages):
        self.ids, self.slot, self.pages, self.done = ids, slot, pages, 0


@torch.no_grad()
def _step(model, cache, seqs, counts):
    """Feed the next counts[b] tokens of each sequence in one packed batch; logits of all tokens."""
    batch = ForwardBatch.build(
        [s.ids[s.done : s.done + n] for s, n in zip(seqs, counts)],
        [s.done for s in seqs],
        [s.slot for s in seqs],
        [s.pages for s in seqs],
        BS,
        logits="all",
    )
    out = model(batch, cache)
    rows = torch.tensor([0, *counts]).cumsum(0).tolist()
    for s, n in zip(seqs, counts):
        s.done += n
    return [out[rows[b] : rows[b + 1]] for b in range(len(seqs))]


def test_prefill_then_decode_steps_equal_full_forward(model):
    ids = _ids(30, seed=1)
    full = logits_of(model, ids)
    cache = new_cache(model, num_blocks=16, block_size=BS)
    seq = Seq(ids, slot=5, pages=[9, 3, 14, 0, 7, 12, 1, 4])
    got = _step(model, cache, [seq], [19])
    for _ in range(11):
        got += _step(model, cache, [seq], [1])  # decode path: conv update + selective state update
    torch.testing.assert_close(torch.cat(got), full, atol=1e-5, rtol=1e-5)


def test_chunked_prompt_equals_one_shot(model):
    ids = _ids(37, seed=2)
    full = logits_of(model, ids)
    cache = new_cache(model, num_blocks=16, block_size=BS)
    seq = Seq(ids, slot=2, pages=[6, 11, 2, 15, 0, 9, 4, 13, 8, 1])
    got = []
    for n in [13, 1, 2, 17, 4]:  # chunks shorter than the conv window and across SSD chunks
        got += _step(model, cache, [seq], [n])
    torch.testing.assert_close(torch.cat(got), full, atol=1e-5, rtol=1e-5)


def test_packed_ragged_batches_equal_each_sequence_alone(model):
    lengths = [11, 1, 26, 6]
    seqs = [
        Seq(_ids(n, seed=10 + i), slot, pages)
        for i, (n, slot, pages) in enumerate(
            zip(lengths, [6, 0, 3, 1], [[17, 2, 9], [5], [0, 12, 8, 19, 3, 14, 7], [11, 4]])
        )
    ]
    alone = [logits_of(model, s.ids) for s in seqs]
    cache = new_cache(model, num_slots=8, num_blocks=20, block_size=BS)
    got = [[] for _ in seqs]
    # step 1: three fresh prompts of different lengths (sequence 1 waits)
    for b, out in zip([0, 2, 3], _step(model, cache, [seqs[0], seqs[2], seqs[3]], [7, 9, 3])):
        got[b].append(out)
    # step 2: continuing prefill chunks mixed with a fresh one-token prompt
    for b, out in zip([2, 1, 0], _step(model, cache, [seqs[2], seqs[1], seqs[0]], [12, 1, 2])):
        got[b].append(out)
    # steps 3..: pure decode batches of the unfinished sequences, then the tails
    for _ in range(2):
        active = [b for b in (3, 0, 2) if seqs[b].done < lengths[b]]
        for b, out in zip(active, _step(model, cache, [seqs[b] for b in active], [1] * len(active))):
            got[b].append(out)
    active = [b for b in range(4) if seqs[b].done < lengths[b]]
    rest = [lengths[b] - seqs[b].done for b in active]
    for b, out in zip(active, _step(model, cache, [seqs[b] for b in active], rest)):
        got[b].append(out)
    for b in range(4):
        torch.testing.assert_close(torch.cat(got[b]), alone[b], atol=1e-5, rtol=1e-5)


def test_fresh_sequence_ignores_stale_state_in_its_slot(model):
    """A reused slot / page with leftovers from an earlier sequence must not leak into a new one."""
    cache = new_cache(model, num_blocks=16, block_size=BS)
    _step(model, cache, [Seq(_ids(9, seed=4), slot=1, pages=[3, 5, 7])], [9])
    ids = _ids(10, seed=5)
    got = _step(model, cache, [Seq(ids, slot=1, pages=[5, 3, 8])], [10])[0]
    torch.testing.assert_close(got, logits_of(model, ids), atol=1e-5, rtol=1e-5)
