"""Sampler rules against small hand-computed cases, and the counter-based noise."""

from __future__ import annotations

import math

import pytest
import torch

from hybridserve.engine.request import Request
from hybridserve.engine.sampler import Sampler, SamplingMetadata
from hybridserve.engine.step_plan import SamplingInputs
from hybridserve.ops.reference import sampling as ref
from hybridserve.sampling_params import SamplingParams, SamplingParamsError


def row(prompt=(1,), output=(), stop=frozenset({2}), seed=0, **params) -> Request:
    params.setdefault("max_tokens", 100)
    r = Request("r", list(prompt), SamplingParams(**params), seed=seed, max_tokens=params["max_tokens"], stop_token_ids=stop)
    r.token_ids += list(output)
    return r


def metadata(rows) -> SamplingMetadata:
    return SamplingMetadata.build(SamplingInputs.of(rows, list(range(len(rows)))), torch.device("cpu"))


def sample(logits, rows):
    return Sampler()(logits.clone(), metadata(rows)).to_host()


def test_greedy_and_temperature_zero_pick_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.99]])
    ids, lps = sample(logits, [row(temperature=0), row(top_k=1, temperature=1.5)])
    assert ids == [1, 0] and lps is None


def test_logit_bias_and_min_tokens_suppression():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]] * 3)
    ids, _ = sample(logits, [
        row(temperature=0, logit_bias={0: 2.5}),  # 3.5 beats 3.0
        row(temperature=0, logit_bias={2: -100}),  # 2 is out, 1 wins
        row(temperature=0, stop=frozenset({2}), min_tokens=1),  # token 2 is a stop token: masked at output 0
    ])
    assert ids == [0, 1, 1]
    ids, _ = sample(logits[:1], [row(temperature=0, stop=frozenset({2}), min_tokens=1, output=[5])])
    assert ids == [2]  # min_tokens reached: the stop token is allowed again


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 0.0]])
    # prompt has token 0; output has token 2 twice and token 3 once
    r = row(prompt=[0], output=[2, 2, 3], temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
            repetition_penalty=2.0)
    meta = metadata([r])
    out = logits.clone()
    Sampler._apply_penalties(out, meta.penalties)
    # token 0: prompt only -> 2/2 = 1; token 2: 1/2 - 0.25*2 - 0.5 = -0.5; token 3: 0.5/2 - 0.25 - 0.5 = -0.5
    expected = torch.tensor([[1.0, -1.0, -0.5, -0.5, 0.0]])
    torch.testing.assert_close(out, expected)
    # and the sampler applies them: without penalties 0 wins; with them 0 (1.0) still wins over 4 (0.0)
    ids, _ = sample(logits, [r])
    assert ids == [0]
    r2 = row(prompt=[0], output=[0], temperature=0, repetition_penalty=2.0, frequency_penalty=1.0)
    ids, _ = sample(logits, [r2])  # token 0: 2/2 - 1 = 0 -> token 2 (1.0) wins
    assert ids == [2]


def test_penalties_of_many_rows_each_see_only_their_own_tokens():
    """Rows between unpenalised ones, one without output, repeated ids: each row is penalised by its
    own prompt and output counts alone."""
    logits = torch.randn(5, 7)
    rows = [row(prompt=[0, 1], output=[3, 3, 6], presence_penalty=0.5, frequency_penalty=0.3),
            row(prompt=[2], output=[4]),  # no penalty
            row(prompt=[5, 5], output=[], repetition_penalty=1.5),
            row(prompt=[1], output=[1, 2, 2, 2], frequency_penalty=1.0, repetition_penalty=1.2),
            row(prompt=[6], output=[0])]  # no penalty
    out = logits.clone()
    Sampler._apply_penalties(out, metadata(rows).penalties)
    expected = logits.clone()
    for i in (0, 2, 3):
        r, p = rows[i], rows[i].params
        mask = torch.zeros(1, 7, dtype=torch.bool)
        mask[0, r.token_ids[: r.num_prompt_tokens]] = True
        counts = torch.zeros(1, 7, dtype=torch.int32)
        for t in r.output_token_ids:
            counts[0, t] += 1
        one = expected[i : i + 1].clone()
        ref.apply_penalties(one, mask, counts, torch.tensor([p.presence_penalty]), torch.tensor([p.frequency_penalty]),
                            torch.tensor([p.repetition_penalty]))
        expected[i] = one[0]
    torch.testing.assert_close(out, expected)


def test_negative_logits_are_multiplied_by_the_repetition_penalty():
    logits = torch.tensor([[-1.0, -1.5]])
    out = logits.clone()
    ref.apply_penalties(out, torch.tensor([[True, False]]), torch.zeros(1, 2, dtype=torch.int32),
                        torch.zeros(1), torch.zeros(1), torch.tensor([2.0]))
    torch.testing.assert_close(out, torch.tensor([[-2.0, -1.5]]))


def test_filters_top_k_top_p_min_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()[None].repeat(4, 1)
    out = ref.filter_logits(
        logits,
        top_k=torch.tensor([2, 0, 0, 0], dtype=torch.int32),
        top_p=torch.tensor([1.0, 0.7, 0.76, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.4]),
    )
    kept = torch.isfinite(out).tolist()
    assert kept[0] == [True, True, False, False]  # top 2
    assert kept[1] == [True, True, False, False]  # 0.5 < 0.7 so the second is needed; 0.75 >= 0.7
    assert kept[2] == [True, True, True, False]  # 0.75 < 0.76: a third token is needed
    assert kept[3] == [True, True, False, False]  # min_p 0.4 * 0.5 = 0.2 > 0.15
    torch.testing.assert_close(out[0, :2], logits[0, :2])


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.clamp_min(1e-30).log()[None].repeat(4000, 1)
    rows = [row(temperature=1.0, seed=i) for i in range(4000)]
    ids, _ = sample(logits, rows)
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    # top_p 0.8 keeps {0, 1}: renormalised 2/3, 1/3
    ids, _ = sample(logits, [row(temperature=1.0, seed=i, top_p=0.8) for i in range(4000)])
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.03, rtol=0)


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [row(temperature=1.0, seed=100 + i, output=[3] * i) for i in range(6)]
    together, _ = sample(logits, rows)
    alone = [sample(logits[i : i + 1], [rows[i]])[0][0] for i in range(6)]
    reversed_ = sample(logits.flip(0), rows[::-1])[0][::-1]
    assert together == alone == reversed_
    # a different position (counter) or seed gives different noise
    u = ref.uniform_noise(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 1000)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.02


def test_forced_token_overrides_the_pick():
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]])
    r = row(temperature=0, thinking_budget=2, thinking_end_token_id=3, output=[1, 1])
    ids, _ = sample(logits, [r])
    assert ids == [3]
    r = row(temperature=0, thinking_budget=2, thinking_end_token_id=3, output=[1])
    assert sample(logits, [r])[0] == [1]


def test_thinking_budget_waits_for_a_newline_within_the_grace_window():
    p = dict(thinking_budget=2, thinking_end_token_id=3, thinking_grace_tokens=3, newline_token_ids=[9])
    assert row(output=[1, 1], **p).forced_next_token() is None  # budget reached, grace running
    assert row(output=[1, 1, 9], **p).forced_next_token() == 3  # a newline inside the grace window
    assert row(output=[1, 9], **p).forced_next_token() is None  # newline before the budget: no
    assert row(output=[1, 1, 1, 1, 1], **p).forced_next_token() == 3  # grace exhausted
    closed = row(output=[], **p)
    closed.append_token(3)  # the model closed reasoning itself
    closed.token_ids += [1, 1, 1, 1]
    assert closed.forced_next_token() is None


def test_a_tool_call_start_closes_reasoning_without_a_forced_end():
    p = dict(thinking_budget=2, thinking_end_token_id=3, thinking_implicit_end_token_ids=[14])
    r = row(output=[], **p)
    r.append_token(14)  # `<tool_call>` with no `</think>` before it
    r.token_ids += [1, 1, 1]
    assert r.forced_next_token() is None
    assert row(output=[1, 1], **p).forced_next_token() == 3  # still open without it


def test_logprobs_are_the_raw_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(2, 30)
    rows = [row(temperature=0, logprobs=3, logit_bias={0: 50.0}), row(temperature=0)]
    ids, lps = sample(logits, rows)
    assert ids[0] == 0 and lps[1] is None
    expected = torch.log_softmax(logits[0], dim=-1)
    sampled, *top = lps[0]
    assert sampled.token_id == 0
    assert math.isclose(sampled.logprob, expected[0].item(), rel_tol=1e-5)
    assert sampled.rank == int((expected > expected[0]).sum()) + 1
    values, indices = expected.topk(3)
    assert [t.token_id for t in top] == indices.tolist() and [t.rank for t in top] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([t.logprob for t in top]), values)


def test_invalid_parameters_raise_clear_errors():
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias={99999: 1.0}).validate_vocab(512)
