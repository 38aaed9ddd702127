"""Overlapped (async) scheduling gives exactly the synchronous engine's outputs: the same workload
run both ways on the tiny model — greedy, seeded, n > 1 with early stops, preemption, aborts
(after a number of tokens, and at a fixed step while a step is in flight), stop strings,
min_tokens, penalties, logprobs and thinking-budget forced tokens — and async really overlaps
(steps are launched while the previous step's tokens are not applied yet)."""

from __future__ import annotations

import random

import pytest

from hybridserve import LLM
from hybridserve.engine.engine_core import EngineCore
from hybridserve.sampling_params import SamplingParams
from tests.engine.test_engine_core import EOS, assert_all_free, mixed_prompts


def drive(core: EngineCore, prompts, params, *, abort_after: dict[str, int] | None = None,
          abort_at_step: dict[str, int] | None = None) -> tuple[dict, dict, dict]:
    """Run to the end; returns request id -> per choice: token lists, (finish_reason, stop_reason),
    logprob entries per token. abort_after: abort a request once it has
    received this many tokens (what a client or a stop string does); abort_at_step: abort it at
    this step() call, whatever it has received."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        core.add_request(f"r{i}", prompt, p)
    tokens = {f"r{i}": [[] for _ in range(p.n)] for i, p in enumerate(params)}
    ends = {f"r{i}": [None] * p.n for i, p in enumerate(params)}
    logprobs = {f"r{i}": [[] for _ in range(p.n)] for i, p in enumerate(params)}
    received = dict.fromkeys(tokens, 0)

    def record(out) -> None:
        for d in out.deltas:
            tokens[out.request_id][d.index] += d.token_ids
            received[out.request_id] += len(d.token_ids)
            if d.finish_reason is not None:
                ends[out.request_id][d.index] = (d.finish_reason, d.stop_reason)
            logprobs[out.request_id][d.index] += d.logprobs or []

    step = 0
    while core.has_unfinished():
        for rid, at in (abort_at_step or {}).items():
            if at == step and (out := core.abort(rid)) is not None:
                record(out)
        for out in core.step():
            record(out)
            limit = (abort_after or {}).get(out.request_id)
            if limit is not None and received[out.request_id] >= limit and not out.finished:
                record(core.abort(out.request_id))
        core.scheduler.check_invariants()
        step += 1
    assert_all_free(core)
    return tokens, ends, logprobs


def assert_same_logprobs(a: dict, b: dict) -> None:
    """Same tokens and ranks; values equal up to float rounding (the async engine batches one
    more row for a sequence whose stop token is still in flight, which changes the summation
    order of the batched matmuls, never a token)."""
    assert a.keys() == b.keys()
    for rid in a:
        for choice_a, choice_b in zip(a[rid], b[rid], strict=True):
            assert len(choice_a) == len(choice_b)
            for entries_a, entries_b in zip(choice_a, choice_b):
                assert [(e.token_id, e.rank) for e in entries_a] == [(e.token_id, e.rank) for e in entries_b]
                assert [e.logprob for e in entries_a] == pytest.approx([e.logprob for e in entries_b], abs=1e-4)


def both_ways(make_core, prompts, params, **kw):
    """The workload on a synchronous and an async engine; asserts async overlapped its steps."""
    core_fields = kw.pop("core", {})
    results = []
    for async_scheduling in (False, True):
        core = make_core(async_scheduling=async_scheduling, **core_fields)
        overlapped = count_overlapped_launches(core)
        results.append(drive(core, prompts, params, **kw))
        assert (overlapped[0] > 0) == async_scheduling
    return results


def count_overlapped_launches(core: EngineCore) -> list[int]:
    """Counts forwards launched while the previous step's tokens are not applied yet."""
    count = [0]
    forward = core.runner.forward

    def counting(plan):
        count[0] += core._in_flight is not None
        return forward(plan)

    core.runner.forward = counting
    return count


def test_greedy_seeded_and_n_choices_match(make_core):
    prompts = mixed_prompts(24, seed=2)
    rng = random.Random(0)
    params = [SamplingParams(temperature=rng.choice([0, 0.8]), top_p=rng.choice([1.0, 0.9]), seed=100 + i,
                             n=1 + i % 3, max_tokens=rng.randint(1, 14), logit_bias={EOS: rng.choice([0.0, 3.0])},
                             logprobs=rng.choice([None, 0, 2]))
              for i in range(24)]
    (sync_tokens, sync_ends, sync_lps), (async_tokens, async_ends, async_lps) = both_ways(
        make_core, prompts, params, core={"max_num_batched_tokens": 40})
    assert async_tokens == sync_tokens
    assert async_ends == sync_ends
    assert_same_logprobs(async_lps, sync_lps)
    assert any(lp for choices in sync_lps.values() for lp in choices)
    # the interesting cases happened: early stops of one choice among several, and long runs
    assert any(len(c) == 1 and c[0] == EOS for t in sync_tokens.values() for c in t)
    assert any(len(c) >= 10 for t in sync_tokens.values() for c in t)


def test_preemption_matches(make_core):
    prompts = mixed_prompts(16, seed=4)
    params = [SamplingParams(temperature=0.7, seed=i, n=1 + i % 2, max_tokens=16, ignore_eos=True) for i in range(16)]
    core = {"num_blocks": 14, "max_num_seqs": 8, "max_num_batched_tokens": 32}
    (sync_tokens, *_), (async_tokens, *_) = both_ways(make_core, prompts, params, core=core)
    assert async_tokens == sync_tokens
    tight = make_core(**core)
    drive(tight, prompts, params)
    assert tight.scheduler.num_preemptions_total > 0


def test_aborts_match(make_core):
    prompts = mixed_prompts(12, seed=5)
    params = [SamplingParams(temperature=0, n=1 + i % 3, max_tokens=12, ignore_eos=True) for i in range(12)]
    # aborted once a request has received k tokens (clients, stop strings): identical outputs
    abort_after = {f"r{i}": 1 + i for i in range(0, 12, 2)}
    (sync_tokens, sync_ends, _), (async_tokens, async_ends, _) = both_ways(make_core, prompts, params,
                                                                           abort_after=abort_after)
    assert async_tokens == sync_tokens and async_ends == sync_ends
    assert any(e == ("abort", None) for rid in abort_after for e in sync_ends[rid])
    # aborted at a fixed step, with a step in flight: what was delivered is a prefix of the full output
    full, *_ = drive(make_core(), prompts, params)
    at_step = {f"r{i}": i for i in range(1, 12, 3)}
    cut, ends, _ = drive(make_core(async_scheduling=True), prompts, params, abort_at_step=at_step)
    for rid in at_step:
        assert all(c == f[: len(c)] for c, f in zip(cut[rid], full[rid]))
        assert all(e is not None and e[0] == "abort" or len(c) == 12 for c, e in zip(cut[rid], ends[rid]))
    for rid in set(full) - set(at_step):
        assert cut[rid] == full[rid]


def test_min_tokens_penalties_and_thinking_budget_match(make_core):
    prompts = mixed_prompts(10, seed=6)
    end = 13  # </think> in the tiny tokenizer
    params = [
        SamplingParams(temperature=0, max_tokens=10, min_tokens=6, logit_bias={EOS: 5.0}),
        SamplingParams(temperature=0.9, seed=3, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=12, presence_penalty=1.5, ignore_eos=True, n=2),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_budget=3, thinking_end_token_id=end),
        SamplingParams(temperature=0.8, seed=9, max_tokens=12, ignore_eos=True, thinking_budget=2,
                       thinking_end_token_id=end, thinking_grace_tokens=4, newline_token_ids=[5, 6, 7]),
    ] * 2
    (sync_tokens, *_), (async_tokens, *_) = both_ways(make_core, prompts, params)
    assert async_tokens == sync_tokens
    assert sync_tokens["r3"][0][3] == end  # the budget forced the end token
    assert EOS not in sync_tokens["r0"][0][:6]  # min_tokens held the (favoured) eos back


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_strings_through_llm(tiny_model, async_scheduling):
    llm = LLM("tiny", device="cpu", max_model_len=256, model_instance=tiny_model, async_scheduling=async_scheduling)
    base = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = base.text[6:9]
    out = llm.generate(["Hello world"] * 3, SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True,
                                                           n=2))
    for o in out:
        for choice in o.outputs:
            assert choice.text == base.text[: base.text.index(stop)] and choice.stop_reason == stop
            assert choice.token_ids == base.token_ids[: len(choice.token_ids)]
    assert_all_free(llm.engine)


def test_structured_outputs_match(make_core):
    """Grammar rows are not held back: their masks are filled after the previous step's tokens are
    applied (while the forward runs), so async gives the same outputs."""
    from hybridserve.structured import grammars as G
    from tests.structured.conftest import SCHEMAS

    prompts = mixed_prompts(8, seed=7)
    names = sorted(SCHEMAS)
    params = [SamplingParams(structured=G.build_spec(G.json_schema(SCHEMAS[names[i % len(names)]]), "json"),
                             temperature=0.9 * (i % 2), seed=i, n=1 + i % 2, max_tokens=60) for i in range(8)]
    (sync_tokens, sync_ends, _), (async_tokens, async_ends, _) = both_ways(
        make_core, prompts, params, core={"max_model_len": 512})
    assert async_tokens == sync_tokens and async_ends == sync_ends
    assert any(e == ("stop", None) or (e and e[0] == "stop") for ends in sync_ends.values() for e in ends)
