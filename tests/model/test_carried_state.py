"""State carried between steps is exact: Mamba conv/SSM slots and paged KV give the same logits
as one full forward pass, however the tokens are split into steps or packed with others; a state
captured inside a chunk (a prefix-cache snapshot) is the state after that prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import logits_of, new_cache, randomize_, tiny_config

from hybridserve.config import ModelConfig
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.nemotron_h import NemotronHForCausalLM
from hybridserve.model.state_capture import StateCapture

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
def _step(model, cache, seqs, counts, captures=()):
    """Feed the next counts[b] tokens of each sequence in one packed batch; logits of all tokens.
    captures: (sequence index, state row, position) snapshots inside the chunks."""
    batch = ForwardBatch.build(
        [s.ids[s.done : s.done + n] for s, n in zip(seqs, counts)],
        [s.done for s in seqs],
        [s.slot for s in seqs],
        [s.pages for s in seqs],
        BS,
        logits="all",
    )
    if captures:
        batch.capture = StateCapture.build(
            np.array([(seqs[b].slot, row, pos) for b, row, pos in captures], dtype=np.int64),
            np.array([s.slot for s in seqs]), np.array([s.done for s in seqs]), np.array(counts), torch.from_numpy)
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


def test_states_captured_inside_chunks_are_the_states_after_their_prefix(model):
    """One ragged step: a continuing chunk captured twice inside, a fresh prompt captured one token
    in (its conv window still reaches the zeros before it), one without a capture. The logits and
    the slots' final states are those of the same step without captures, each snapshot row holds
    the state after its prefix alone, and a sequence resumed from a snapshot row continues exactly."""
    a, b, c = (_ids(n, seed=20 + i) for i, n in enumerate((30, 12, 5)))
    runs = []
    for captures in ((), ((2, 6, 17), (0, 7, 1), (2, 0, 13))):  # (sequence index, state row, position)
        cache = new_cache(model, num_slots=8, num_blocks=24, block_size=BS)
        seqs = [Seq(b, 1, [0, 1, 2]), Seq(c, 4, [3, 4]), Seq(a, 2, list(range(5, 13)))]
        _step(model, cache, [seqs[2]], [10])
        runs.append((_step(model, cache, seqs, [12, 5, 13], captures), cache))
    (plain, plain_cache), (got, cache) = runs
    for g, w in zip(got, plain):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for state in ("conv_state", "ssm_state"):
        slots = [1, 2, 4]
        torch.testing.assert_close(getattr(cache, state)[:, slots], getattr(plain_cache, state)[:, slots], atol=1e-5,
                                   rtol=1e-5)
    for ids, row, depth, steps in ((a, 6, 17, [10, 7]), (a, 0, 13, [10, 3]), (b, 7, 1, [1])):
        alone = new_cache(model, num_slots=8, num_blocks=24, block_size=BS)
        seq = Seq(ids, 0, list(range(8)))
        for n in steps:
            _step(model, alone, [seq], [n])
        torch.testing.assert_close(cache.conv_state[:, row], alone.conv_state[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.ssm_state[:, row], alone.ssm_state[:, 0], atol=1e-5, rtol=1e-5)
        # resume from the snapshot row (its KV pages copied from the run alone) to the end
        resumed = Seq(ids, row, list(range(8)))
        resumed.done = depth
        cache.kv[:, :, :8] = alone.kv[:, :, :8]
        rest = _step(model, cache, [resumed], [len(ids) - depth])[0]
        torch.testing.assert_close(rest, logits_of(model, ids)[depth:], atol=1e-5, rtol=1e-5)
