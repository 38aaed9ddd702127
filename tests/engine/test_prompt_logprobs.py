"""prompt_logprobs (vLLM semantics): each prompt token's logprob given the tokens before it, its
rank and the top-k alternatives, the first token None — equal to the model's own log-softmax of a
plain one-pass forward, though the engine computes them across a chunked prefill, beside other
requests, sync and async, and sends them once per request."""

from __future__ import annotations

import random

import pytest
import torch

from hybridserve import LLM
from hybridserve.engine import scheduler as scheduler_module
from hybridserve.sampling_params import SamplingParams, SamplingParamsError
from tests.engine.test_engine_core import assert_all_free
from tests.model.model_helpers import logits_of

K = 3


def expected_prompt_logprobs(model, prompt: list[int]) -> list:
    logprobs = torch.log_softmax(logits_of(model, prompt), dim=-1)
    out = [None]
    for p in range(1, len(prompt)):
        row = logprobs[p - 1]
        target = prompt[p]
        top_lp, top_ids = row.topk(K)
        out.append((target, row[target].item(), int((row > row[target]).sum()) + 1, top_ids.tolist(), top_lp.tolist()))
    return out


def assert_matches(entries, expected) -> None:
    assert len(entries) == len(expected) and entries[0] is None and expected[0] is None
    for got, (target, logprob, rank, top_ids, top_lps) in zip(entries[1:], expected[1:]):
        assert (got[0].token_id, got[0].rank) == (target, rank)
        assert got[0].logprob == pytest.approx(logprob, abs=1e-4)
        assert [e.token_id for e in got[1:]] == top_ids and [e.rank for e in got[1:]] == [1, 2, 3]
        assert [e.logprob for e in got[1:]] == pytest.approx(top_lps, abs=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_equal_a_plain_forward_across_chunks(make_core, tiny_model, monkeypatch, async_scheduling):
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGPROB_ROWS_PER_STEP", 7)  # more, smaller chunks
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (41, 1, 2, 23)]
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=K, n=2),
              SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K),
              SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=4)]  # none asked
    core = make_core(max_num_batched_tokens=16, async_scheduling=async_scheduling)
    steps = []
    forward = core.runner.forward
    core.runner.forward = lambda plan: steps.append(len(plan.prompt_logprob_indices)) or forward(plan)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        core.add_request(f"r{i}", prompt, p)
    sent: dict[str, list] = {}
    while core.has_unfinished():
        for out in core.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in sent, "sent twice"
                assert any(d.token_ids for d in out.deltas), "sent before the first token"
                sent[out.request_id] = out.prompt_logprobs
        core.scheduler.check_invariants()
    assert_all_free(core)
    assert sorted(sent) == ["r0", "r1", "r2"]
    assert max(steps) == 7 and sum(steps) == 40 + 0 + 1  # capped per step, each token scored once
    assert_matches(sent["r0"], expected_prompt_logprobs(tiny_model, prompts[0]))
    assert sent["r1"] == [None]
    assert len(sent["r2"]) == 2 and len(sent["r2"][1]) == 1  # prompt_logprobs=0: the token's own entry only
    assert sent["r2"][1][0].token_id == prompts[2][1]


def test_prompt_logprobs_through_llm_generate(tiny_model):
    llm = LLM("tiny", device="cpu", max_model_len=256, model_instance=tiny_model, max_num_batched_tokens=16)
    prompt = [7, 99, 4, 250, 31, 8, 77, 12, 5, 300, 41, 9, 16, 2, 88, 61, 20, 33, 71, 45]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K))[0]
    assert_matches(out.prompt_logprobs, expected_prompt_logprobs(tiny_model, prompt))
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_prompt_logprobs_range_is_checked():
    with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
