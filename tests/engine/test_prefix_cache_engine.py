"""Prefix caching through the real engine (tiny model, reference ops, CPU): outputs identical with
caching on and off — greedy and seeded, multi-turn replays, chunked prefill, n > 1, preemption
and aborts under small pools — and the hits each request reports."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from test_engine_core import assert_all_free, mixed_prompts

from hybridserve.engine.engine_core import EngineCore
from hybridserve.model.loader import load_model
from hybridserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
CONTEXT_GAIN = 10.0


@pytest.fixture(scope="module")
def context_model(tiny_config):
    """The tiny model with its mixers' outputs scaled up: random init leaves them tiny next to the
    embeddings, so the next token would hardly depend on the context (a lost Mamba state would go
    unnoticed); here it does."""
    model = load_model(tiny_config, load_format="dummy", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight")):
                p.mul_(CONTEXT_GAIN)
    return model


@pytest.fixture
def make_core(make_core, context_model):
    return functools.partial(make_core, model=context_model)


def generate(core: EngineCore, prompts: list[list[int]], params, *, aborts: dict[int, int] | None = None,
             tag: str = "") -> tuple[list[list[list[int]]], list[int]]:
    """Run prompts together to the end: (tokens per request per choice, cached tokens per request).
    aborts: request index -> the step at which to abort it."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        core.add_request(f"{tag}{i}", prompt, p)
    tokens = [[[] for _ in range(p.n)] for p in params]
    cached = [0] * len(prompts)
    steps = 0
    while core.has_unfinished():
        for i, at in (aborts or {}).items():
            if at == steps:
                core.abort(f"{tag}{i}")
        for out in core.step():
            i = int(out.request_id.removeprefix(tag))
            cached[i] = out.num_cached_tokens
            for d in out.deltas:
                tokens[i][d.index] += d.token_ids
        core.scheduler.check_invariants()
        steps += 1
    assert_all_free(core)
    return tokens, cached


def conversation(rng: random.Random, system: list[int], turns: int):
    """A multi-turn replay: each turn resends the whole history (previous prompts and answers)."""
    history = list(system)

    def next_prompt(answer: list[int]) -> list[int]:
        history.extend(answer)
        history.extend(rng.randrange(3, 500) for _ in range(rng.randint(1, 20)))  # the user's next message
        return list(history)

    return next_prompt


@pytest.mark.parametrize("overlap", [True, False])
def test_multi_turn_replay_is_identical_and_hits_at_each_previous_answer(make_core, overlap):
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(40)]
    on = make_core(async_scheduling=overlap)
    off = make_core(enable_prefix_caching=False, async_scheduling=overlap)
    results = {}
    for name, core in (("on", on), ("off", off)):
        next_prompt = conversation(random.Random(1), system, 4)
        answer, answers, hits, prompts = [], [], [], []
        for turn in range(4):
            prompt = next_prompt(answer)
            (choices,), (cached,) = generate(core, [prompt], GREEDY, tag=f"t{turn}-")
            answer = choices[0]
            prompts.append(prompt)
            answers.append(answer)
            hits.append(cached)
        results[name] = answers
        if name == "on":
            # turn k resumes from turn k-1's final state: its prompt and every answer token but the last
            assert hits == [0] + [len(prompts[k - 1]) + len(answers[k - 1]) - 1 for k in range(1, 4)]
            assert on.stats().prefix_cache_hits_total == sum(hits)
            assert on.stats().prefix_cache_queries_total == sum(len(p) for p in prompts)
        else:
            assert hits == [0, 0, 0, 0]
    assert results["on"] == results["off"]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_multi_turn_hit_streams_its_first_token_after_one_step(make_core, overlap):
    """Time to first token in engine steps, while another sequence decodes: from turn 1 on, a turn
    resumes at the previous answer's final state and prefills the rest in the step that admits it,
    which samples its first token (one step; with overlapped scheduling the next call hands it out,
    so two calls). Without caching the same prompts take one step per budget's worth of tokens."""
    rng = random.Random(4)
    system = [rng.randrange(3, 500) for _ in range(70)]
    calls, answers = {}, {}
    for caching in (True, False):
        core = make_core(async_scheduling=overlap, enable_prefix_caching=caching, max_num_batched_tokens=32)
        core.add_request("background", [5, 6, 7], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        core.step()
        next_prompt = conversation(random.Random(5), system, 4)
        answer, calls[caching], answers[caching] = [], [], []
        for turn in range(4):
            core.add_request(f"t{turn}", next_prompt(answer), GREEDY)
            answer, n = [], 0
            while len(answer) < GREEDY.max_tokens:
                outs = core.step()
                n += 1
                for o in outs:
                    if o.request_id == f"t{turn}":
                        if not answer:
                            calls[caching].append(n)
                        answer += [t for d in o.deltas for t in d.token_ids]
            answers[caching].append(answer)
        core.abort("background")
        while core.has_unfinished():
            core.step()
        assert_all_free(core)
    lag = 1 if overlap else 0  # overlapped: a step's tokens are handed out by the next call
    assert calls[True][1:] == [1 + lag] * 3
    assert all(c > 2 + lag for c in calls[False][1:])  # 80+ tokens in 32-token chunks
    assert answers[True] == answers[False]


def test_shared_system_prompt_hits_at_its_last_full_block(make_core):
    rng = random.Random(2)
    system = [rng.randrange(3, 500) for _ in range(50)]  # 3 full blocks + 2 tokens
    core = make_core()
    generate(core, [system + [7, 8, 9]], GREEDY, tag="first-")
    suffixes = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 30))] for _ in range(4)]
    tokens, cached = generate(core, [system + s for s in suffixes], GREEDY)
    assert cached == [48] * 4  # the snapshot at the first prompt's last full block
    off, _ = generate(make_core(enable_prefix_caching=False), [system + s for s in suffixes], GREEDY)
    assert tokens == off


def test_prompts_sharing_only_a_system_prompt_hit_from_the_third_on(make_core):
    """The second prompt leaves the first one's cached blocks at the end of the shared system prompt
    and snapshots its state there: every later prompt with that system prompt hits at it."""
    rng = random.Random(3)
    system = [rng.randrange(3, 500) for _ in range(48)]
    prompts = [system + [rng.randrange(3, 500) for _ in range(rng.randint(2, 30))] for _ in range(5)]
    on, off = make_core(), make_core(enable_prefix_caching=False)
    results = {True: [], False: []}
    for core, caching in ((on, True), (off, False)):
        for k, prompt in enumerate(prompts):
            (choices,), (cached,) = generate(core, [prompt], GREEDY, tag=f"p{k}-")
            results[caching].append((choices, cached))
    assert [c for _, c in results[True]] == [0, 0, 48, 48, 48]
    assert [t for t, _ in results[True]] == [t for t, _ in results[False]]


@pytest.mark.parametrize("budget,num_blocks", [(8, 14), (37, 14), (4096, 14), (37, 64)])
def test_identical_outputs_with_caching_on_and_off_under_pressure(make_core, budget, num_blocks):
    """Waves of greedy, seeded and n > 1 requests whose prompts extend earlier prompts and answers,
    through a small KV pool (preemption), a small snapshot pool (eviction), chunked prefill and
    aborts: the same tokens with caching on and off."""
    rng = random.Random(budget)
    bases = mixed_prompts(12, seed=4)
    waves, texts = [], [p[:60] for p in bases]
    for w in range(3):
        prompts, params = [], []
        for i in range(10):
            base = rng.choice(texts)
            base = base if rng.random() < 0.6 else base[: rng.randint(1, 70)]
            prompts.append((base + [rng.randrange(3, 500) for _ in range(rng.randint(1, 12))])[:100])
            kind = rng.random()
            params.append(GREEDY if kind < 0.4 else SamplingParams(
                temperature=1.0, top_p=0.9, seed=100 * w + i, n=rng.randint(1, 3), max_tokens=rng.randint(1, 12),
                ignore_eos=True))
        waves.append((prompts, params, {rng.randrange(10): rng.randrange(6)}))
        texts += prompts
    outputs = {}
    for caching in (True, False):
        core = make_core(num_blocks=num_blocks, max_num_seqs=8, max_num_batched_tokens=budget,
                         enable_prefix_caching=caching, **({"prefix_cache_snapshots": 4} if caching else {}))
        outputs[caching] = []
        for w, (prompts, params, aborts) in enumerate(waves):
            tokens, cached = generate(core, prompts, params, aborts=aborts, tag=f"w{w}-")
            outputs[caching].append([t for i, t in enumerate(tokens) if i not in aborts])
            if not caching:
                assert cached == [0] * len(prompts)
        if caching and num_blocks == 64:  # (in the small pool, hits depend on what survives)
            assert core.stats().prefix_cache_hits_total > 0
        if num_blocks == 14 and budget > 8:
            assert core.scheduler.num_preemptions_total > 0
    assert outputs[True] == outputs[False]


def test_a_finished_answer_with_a_partial_tail_block_continues_exactly(make_core):
    """The hit copies the finished request's partial tail block (copy-on-write) and restores its
    final state: the continuation equals a run that computes everything."""
    prompt = mixed_prompts()[6][:21]  # 21 tokens
    core = make_core()
    ((answer,),), _ = generate(core, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), tag="a")
    follow = prompt + answer + [42, 43]
    (choices,), (cached,) = generate(core, [follow], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=8,
                                                                    ignore_eos=True), tag="b")
    assert cached == 21 + 6 - 1 and cached % 16
    (fresh,), _ = generate(make_core(enable_prefix_caching=False), [follow],
                           SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=8, ignore_eos=True))
    assert choices == fresh


def test_a_hit_gives_the_logprobs_of_a_full_recompute(make_core):
    """Sharper than equal tokens: the first logprobs after a restored snapshot (a block-aligned one
    and one with a copied tail block) match those of a request computed from scratch."""
    prompt = mixed_prompts()[7][:37]
    scored = SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True)

    def logprobs(core: EngineCore, token_ids: list[int], rid: str) -> list[list[tuple[int, float]]]:
        core.add_request(rid, token_ids, scored)
        out = []
        while core.has_unfinished():
            for o in core.step():
                out += [[(e.token_id, e.logprob) for e in lp] for d in o.deltas for lp in d.logprobs or []]
        return out

    on = make_core()
    ((answer,),), _ = generate(on, [prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), tag="a")
    for follow, depth in ((prompt + [5, 6], 32), (prompt + answer + [9], 37 + 5 - 1)):
        cached = logprobs(on, follow, f"on{depth}")
        assert on.stats().num_snapshots > 0
        fresh = logprobs(make_core(enable_prefix_caching=False), follow, "off")
        assert [[t for t, _ in row] for row in cached] == [[t for t, _ in row] for row in fresh]
        assert [v for row in cached for _, v in row] == pytest.approx([v for row in fresh for _, v in row], abs=1e-4)
    assert on.stats().prefix_cache_hits_total == 32 + 41


def test_prompt_logprobs_requests_compute_their_whole_prompt(make_core):
    """prompt_logprobs score every prompt position, so such a request never resumes from the cache."""
    prompt = mixed_prompts()[7][:40]
    core = make_core()
    generate(core, [prompt], GREEDY, tag="a")
    core.add_request("b", prompt + [5, 6], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    scored, cached = None, set()
    while core.has_unfinished():
        for out in core.step():
            cached.add(out.num_cached_tokens)
            scored = out.prompt_logprobs or scored
    assert cached == {0} and len(scored) == 42 and scored[0] is None and all(scored[1:])
    (_,), (hit,) = generate(core, [prompt + [5, 6]], GREEDY, tag="c")  # the same prompt without: a hit
    assert hit == 32
