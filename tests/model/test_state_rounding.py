"""A 16-bit Mamba SSM state: the rounding itself (stochastic rounding is unbiased, lands on a
neighbour, is a pure function of seed / position / element) and the model over a long generation
(stochastic rounding stays closer to the float32 state than round-to-nearest, and a sequence's
tokens do not depend on its slot or batch)."""

from __future__ import annotations

import pytest
import torch

from hybridserve.config import ModelConfig
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.loader import load_model
from hybridserve.ops.reference.rounding import round_state, state_noise

BS = 16


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16-bit values just below and just above (or at) each float32 value."""
    near = x.to(dtype)
    bits = near.view(torch.int16)
    step = torch.where(near.float() < x, 1, -1) * torch.where(near.float() < 0, -1, 1)
    other = (bits + step.to(torch.int16)).view(dtype)
    other = torch.where(near.float() == x, near, other)
    return torch.minimum(near, other), torch.maximum(near, other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    gen = torch.Generator().manual_seed(0)
    # between grid points (normal and float16 subnormal), both signs, and values on the grid
    base = torch.tensor([1 + 2**-11, -3.3e-3, 7.77, -1234.5, 2.5e-6, 1.0, -0.5], dtype=torch.float32)
    draws = 20000
    x = base.repeat(draws, 1)
    noise = torch.randint(0, 2**32, x.shape, generator=gen, dtype=torch.int64)
    r = round_state(x, dtype, noise)
    lo, hi = _neighbours(base, dtype)
    assert ((r == lo) | (r == hi)).all()
    # E[r] = x: the fraction rounded up is the distance to the lower neighbour, in units of the gap
    gap = (hi.float() - lo.float()).clamp_min(1e-30)
    frac_up = (r == hi).float().mean(0)
    expected = torch.where(hi == lo, torch.ones_like(gap), (base - lo.float()) / gap)
    assert torch.allclose(frac_up, expected, atol=4 / draws**0.5)
    # round-to-nearest without noise, and exact values stay exact either way
    assert torch.equal(round_state(base, dtype, None), base.to(dtype))
    exact = base.to(dtype).float()
    assert torch.equal(round_state(exact.repeat(50, 1), dtype, noise[:50]), exact.to(dtype).repeat(50, 1))


def test_state_noise_is_a_function_of_seed_position_and_element():
    pos = torch.tensor([5, 5, 6])
    a = state_noise(123, pos, (2, 3, 4))
    assert a.shape == (3, 2, 3, 4) and int(a.min()) >= 0 and int(a.max()) < 2**32
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert not torch.equal(a, state_noise(124, pos, (2, 3, 4)))
    assert a[0].unique().numel() == 24  # every element draws its own bits


@pytest.fixture(scope="module")
def model():
    # random weights of the tiny preset: dt in [0.001, 0.1] and A in [1, 16], as the real model's
    # init, so some heads decay by less than a 16-bit unit per step
    return load_model(ModelConfig.from_hf("tiny"), load_format="dummy", dtype=torch.float32)


@torch.no_grad()
def _teacher_forced(model, prompts, tokens, state_dtype, rounding_seed, slots=None, num_slots=None):
    """Prefill the prompts in one step, then feed `tokens` [B, L] one step at a time.
    Returns (logits [B, L, V] of every step, the final SSM state of the sequences [L_m, B, H, P, N])."""
    n = len(prompts)
    slots = slots or list(range(n))
    pages = (max(len(p) for p in prompts) + tokens.shape[1]) // BS + 1
    cache = HybridCache.allocate(model.config, num_slots or n, n * pages, BS, model.dtype, state_dtype,
                                 rounding_seed=rounding_seed)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(n)]
    batch = ForwardBatch.build(prompts, [0] * n, slots, tables, BS)
    done = [len(p) for p in prompts]
    logits = []
    for i in range(tokens.shape[1]):
        logits.append(model(batch, cache))
        batch = ForwardBatch.build([[t] for t in tokens[:, i].tolist()], done, slots, tables, BS)
        done = [d + 1 for d in done]
    return torch.stack(logits, 1), cache.ssm_state[:, slots].float()


def test_stochastic_rounding_stays_closer_to_the_float32_state_than_nearest(model):
    """Over a long teacher-forced generation a bfloat16 state rounded to nearest drifts (slowly
    decaying heads stop moving: each step's change is under half a unit); rounded stochastically
    it stays close: smaller state and logit errors, and the logit error does not grow."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 512, (2, 16), generator=gen).tolist()
    steps = 320
    tokens = torch.randint(3, 512, (2, steps), generator=gen)
    ref_logits, ref_state = _teacher_forced(model, prompts, tokens, torch.float32, None)
    errs = {}
    for name, seed in (("nearest", None), ("stochastic", 7)):
        logits, state = _teacher_forced(model, prompts, tokens, torch.bfloat16, seed)
        logit_err = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)  # [B, L]
        errs[name] = dict(state=((state - ref_state).norm() / ref_state.norm()).item(),
                          first=logit_err[:, : steps // 2].mean().item(), last=logit_err[:, steps // 2 :].mean().item())
    near, sr = errs["nearest"], errs["stochastic"]
    assert sr["state"] < near["state"] / 4, errs
    assert sr["last"] < near["last"], errs
    assert near["last"] > near["first"] and sr["last"] < 1.5 * sr["first"], errs


def test_stochastically_rounded_state_does_not_depend_on_slot_or_batch(model):
    """The random bits are keyed by position and element only: a sequence gets the same state bits
    and logits alone in slot 0 as in slot 3 of a batch with others (and so after a preemption)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (21, 5, 40)]
    tokens = torch.randint(3, 512, (3, 24), generator=gen)
    alone_logits, alone_state = _teacher_forced(model, prompts[:1], tokens[:1], torch.bfloat16, 7)
    batch_logits, batch_state = _teacher_forced(model, prompts, tokens, torch.bfloat16, 7, slots=[3, 0, 1],
                                                num_slots=4)
    assert torch.equal(batch_state[:, 0], alone_state[:, 0])
    torch.testing.assert_close(batch_logits[0], alone_logits[0], rtol=0, atol=1e-5)
