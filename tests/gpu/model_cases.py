"""The steps the tiny model runs in the Triton-against-reference model tests (tests/gpu compiled,
tests/ops_interp interpreted): a ragged prefill, a chunked continuation mixed with decodes and a
new prompt (with prefix-cache state captures inside its chunks), then pure decodes."""

import numpy as np
import torch

from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.state_capture import StateCapture

BS = 4
SLOTS = 7  # sequences 0..3, snapshot rows 4..6

# step 1's state captures (slot, snapshot row, position): sequence 1 continues 9 tokens from 17 and
# is captured 2 and 5 in, the fresh sequence 3 two tokens in (its conv window reaches before its start)
CAPTURES = np.array([[1, 4, 22], [3, 5, 2], [1, 6, 19]], dtype=np.int64)


def model_steps(vocab, decodes: int = 2):
    """(new tokens per sequence, sequences) for each step; sequence s owns slot s and pages 8s.."""
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [
        {0: toks(5), 1: toks(17), 2: toks(1)},  # ragged prefill from scratch
        {0: toks(1), 1: toks(9), 2: toks(1), 3: toks(6)},  # chunked continuation + decodes + a new one
        *({0: toks(1), 1: toks(1), 2: toks(1), 3: toks(1)} for _ in range(decodes)),  # pure decode
    ]


def run_steps(model, ops, dtype, ssm_dtype, device, kv_dtype=None, decodes: int = 2):
    """The logits of every step (all tokens) and the caches after the last, with `ops`."""
    model.ops = ops
    cache = HybridCache.allocate(model.config, SLOTS, 64, BS, dtype, ssm_dtype, device=device, kv_dtype=kv_dtype)
    cached = {}
    logits = []
    for i, step in enumerate(model_steps(model.config.vocab_size, decodes)):
        seqs = sorted(step)
        batch = ForwardBatch.build(
            [step[s] for s in seqs], [cached.get(s, 0) for s in seqs], seqs,
            [list(range(8 * s, 8 * s + 8)) for s in seqs], BS, device=device, logits="all",
        )
        if i == 1:
            batch.capture = StateCapture.build(CAPTURES, np.array(seqs), np.array([cached.get(s, 0) for s in seqs]),
                                               np.array([len(step[s]) for s in seqs]),
                                               lambda a: torch.from_numpy(a).to(device))
        with torch.no_grad():
            logits.append(model(batch, cache))
        for s in seqs:
            cached[s] = cached.get(s, 0) + len(step[s])
    return logits, cache


def run_padded_steps(model, ops, dtype, device):
    """The steps (without captures) eager on one cache and padded as a prefill CUDA graph pads them
    (`PrefillGraphs.padded`: a padding sequence up to 64 tokens, empty sequences up to MAX_SEQS) on
    another: (eager logits, padded logits, eager cache, padded cache), one logits row per sequence.
    Row SLOTS and page 64 of each cache are the padding targets."""
    from hybridserve.engine.cuda_graphs import MAX_SEQS, PrefillGraphs

    model.ops = ops
    caches = [HybridCache.allocate(model.config, SLOTS + 1, 65, BS, dtype, torch.float32, device=device)
              for _ in range(2)]
    padder = PrefillGraphs([64], MAX_SEQS, 8, BS, pad_slot=SLOTS, pad_block=64, device=device)
    cached, eager, padded = {}, [], []
    for step in model_steps(model.config.vocab_size, decodes=1):
        seqs = sorted(step)
        batch = ForwardBatch.build([step[s] for s in seqs], [cached.get(s, 0) for s in seqs], seqs,
                                   [list(range(8 * s, 8 * s + 8)) for s in seqs], BS, device=device)
        with torch.no_grad():
            eager.append(model(batch, caches[0]))
            padded.append(model(padder.padded(batch), caches[1])[: len(seqs)])
        for s in seqs:
            cached[s] = cached.get(s, 0) + len(step[s])
    return eager, padded, caches[0], caches[1]


def assert_padding_changes_nothing(eager, padded, cache_e, cache_p, tol):
    """The padded steps' logits and every live slot and KV page are the eager steps'."""
    for e, p in zip(eager, padded):
        torch.testing.assert_close(p, e, rtol=tol, atol=tol)
    torch.testing.assert_close(cache_p.ssm_state[:, :SLOTS], cache_e.ssm_state[:, :SLOTS], rtol=tol, atol=tol)
    torch.testing.assert_close(cache_p.conv_state[:, :SLOTS], cache_e.conv_state[:, :SLOTS], rtol=tol, atol=tol)
    torch.testing.assert_close(cache_p.kv[:, :, :64], cache_e.kv[:, :, :64], rtol=tol, atol=tol)
