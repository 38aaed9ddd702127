"""EngineCore on CPU with the tiny model: batching never changes greedy outputs (together vs alone,
heavy chunking, preemption), the sampler sees the model's true logits, n > 1 forks, seeds, and
every block and slot comes back after finishes and aborts."""

from __future__ import annotations

import random

import pytest
import torch

from hybridserve.engine.engine_core import EngineCore, choice_seed
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
EOS = 2  # the tiny model's eos id


def mixed_prompts(count: int = 32, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 3, 15, 16, 17, 33, 64, 90] + [rng.randint(1, 80) for _ in range(count - 9)]
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths[:count]]


def run(core: EngineCore, prompts, params=GREEDY, *, aborts: dict[str, int] | None = None) -> dict[str, list]:
    """Add everything, step to the end; returns request id -> list of token lists (per choice).
    aborts: request id -> the step at which to abort it."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        core.add_request(f"r{i}", prompt, p)
    tokens = {f"r{i}": [[] for _ in range(p.n)] for i, p in enumerate(params_list)}
    step = 0
    while core.has_unfinished():
        for rid, at in (aborts or {}).items():
            if at == step:
                core.abort(rid)
        for out in core.step():
            for d in out.deltas:
                tokens[out.request_id][d.index] += d.token_ids
        core.scheduler.check_invariants()
        step += 1
    assert_all_free(core)
    return tokens


def assert_all_free(core: EngineCore) -> None:
    s = core.scheduler
    s.check_invariants()
    assert not s.running and not s.waiting and not s.groups
    assert s.cache.block_pool.num_free == s.layout.num_blocks and s.cache.slot_pool.num_free == s.layout.num_slots


def run_alone(core: EngineCore, prompts, params=GREEDY) -> list[list[int]]:
    return [run(core, [p], params)["r0"][0] for p in prompts]


def test_batched_greedy_equals_each_prompt_alone(make_core):
    prompts = mixed_prompts()
    alone = run_alone(make_core(), prompts)
    assert len({tuple(t) for t in alone}) > 16  # distinct prompts give distinct continuations
    together = make_core()
    out = run(together, prompts)
    assert [out[f"r{i}"][0] for i in range(len(prompts))] == alone
    assert together.scheduler.num_preemptions_total == 0
    # heavy chunking: 7 tokens per step (prompts split into many chunks, mixed with decodes)
    chunked = make_core(max_num_batched_tokens=7)
    out = run(chunked, prompts)
    assert [out[f"r{i}"][0] for i in range(len(prompts))] == alone
    # a KV cache so small that requests are preempted and recomputed
    tight = make_core(num_blocks=16, max_num_batched_tokens=64)
    out = run(tight, prompts)
    assert [out[f"r{i}"][0] for i in range(len(prompts))] == alone
    assert tight.scheduler.num_preemptions_total > 0
    assert tight.stats().num_preemptions_total == tight.scheduler.num_preemptions_total


def test_a_reused_state_slot_starts_clean(make_core):
    """A one-token prompt is a first step, not a decode: it must not read the slot's old state."""
    fresh = run(make_core(), [[77]], GREEDY)["r0"][0]
    core = make_core(max_num_seqs=1)  # one slot, reused by every request
    run(core, [mixed_prompts()[8]], GREEDY)
    assert run(core, [[77]], GREEDY)["r0"][0] == fresh


def model_logits(core: EngineCore, token_ids: list[int]) -> torch.Tensor:
    """The oracle: a fresh forward of the whole sequence; logits of every position [L, V]."""
    runner = core.runner
    blocks = list(range(-(-len(token_ids) // runner.block_size)))  # the engine is idle: any blocks do
    batch = ForwardBatch.build([token_ids], [0], [runner.pad_slot], [blocks], runner.block_size, logits="all")
    with torch.inference_mode():
        return runner.model(batch, runner.cache)


def test_greedy_and_logprobs_follow_the_models_logits(make_core):
    core = make_core()
    prompt = mixed_prompts()[5]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    core.add_request("a", prompt, params)
    tokens, logprobs = [], []
    while core.has_unfinished():
        for out in core.step():
            tokens += out.deltas[0].token_ids
            logprobs += out.deltas[0].logprobs
    logits = model_logits(core, prompt + tokens[:-1])[len(prompt) - 1 :]
    expected = torch.log_softmax(logits, dim=-1)
    assert tokens == logits.argmax(-1).tolist()
    for i, entries in enumerate(logprobs):
        sampled, *top = entries
        torch.testing.assert_close(sampled.logprob, expected[i, tokens[i]].item(), rtol=1e-4, atol=1e-5)
        values, ids = expected[i].topk(3)
        assert [t.token_id for t in top] == ids.tolist()
        torch.testing.assert_close([t.logprob for t in top], values.tolist(), rtol=1e-4, atol=1e-5)


def test_seeds_reproduce_whatever_the_batch(make_core):
    prompts = mixed_prompts(12, seed=1)
    sampled = [SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, max_tokens=10, ignore_eos=True)
               for i in range(12)]
    alone = [run(make_core(), [p], [s])["r0"][0] for p, s in zip(prompts, sampled)]
    together = run(make_core(max_num_batched_tokens=9), prompts, sampled)
    assert [together[f"r{i}"][0] for i in range(12)] == alone
    other_seed = run(make_core(), [prompts[0]], [SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)])
    assert other_seed["r0"][0] != alone[0]
    # temperature 0 is greedy whatever the seed and filters
    greedy = run(make_core(), prompts[:3], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    zero_t = run(make_core(), prompts[:3], SamplingParams(temperature=0, top_p=0.5, seed=3, max_tokens=10, ignore_eos=True))
    assert greedy == zero_t


def test_n_choices_fork_from_one_prefill(make_core):
    prompt = mixed_prompts()[7] + [11, 12, 13]  # 67 tokens: 4 full KV blocks and a partial one
    greedy = SamplingParams(temperature=0, max_tokens=8, n=3, ignore_eos=True)
    out = run(make_core(), [prompt], greedy)["r0"]
    single = run(make_core(), [prompt], GREEDY)["r0"][0][:8]
    assert out == [single] * 3  # forked state and KV continue exactly like the original
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=8, n=4, ignore_eos=True)
    core = make_core()
    forked = run(core, [prompt], sampled)["r0"]
    assert len({tuple(t) for t in forked}) == 4  # distinct choices
    # no room to fork (max_num_seqs=1): siblings recompute their prompt instead, same tokens
    recomputed = run(make_core(max_num_seqs=1, num_blocks=32), [prompt], sampled)["r0"]
    assert recomputed == forked


def test_n_choices_share_prompt_blocks_and_equal_separate_seeded_requests(make_core):
    prompt = mixed_prompts()[7] + [11, 12, 13]  # 67 tokens: 4 full KV blocks and a partial one
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=10, n=3, ignore_eos=True)
    core = make_core()
    core.add_request("a", prompt, params)
    seqs = core.scheduler.groups["a"]
    core.step()  # the whole prompt (its state at the last full block, 64, captured for the prefix cache in
    # the same step), forks choices 1 and 2, samples three first tokens
    assert seqs[0].num_computed_tokens == 67 and core.scheduler.cache.num_snapshots == 1
    assert core.scheduler.cache.snapshots.entries[seqs[0].block_keys[3]].depth == 64
    refcounts = core.scheduler.cache.block_pool.refcounts
    full = seqs[0].block_ids[:4]
    assert all(s.block_ids[:4] == full for s in seqs) and [refcounts[b] for b in full] == [3] * 4
    tails = {s.block_ids[4] for s in seqs}
    assert len(tails) == 3 and all(refcounts[b] == 1 for b in tails)  # the partial tail is copied, not shared
    assert len({s.state_slot for s in seqs}) == 3
    core.scheduler.check_invariants()
    tokens = [list(s.output_token_ids) for s in seqs]
    while core.has_unfinished():
        for out in core.step():
            for d in out.deltas:
                tokens[d.index] += d.token_ids
        core.scheduler.check_invariants()
    assert_all_free(core)
    separate = [run(make_core(), [prompt], [SamplingParams(temperature=1.0, top_p=0.95, seed=choice_seed(42, i),
                                                            max_tokens=10, ignore_eos=True)])["r0"][0]
                for i in range(3)]
    assert tokens == separate and len({tuple(t) for t in tokens}) == 3


def test_a_choice_that_stops_on_its_first_token_leaves_its_siblings_running(make_core):
    """Issue 10: choice 0 ending on its first sampled token (eos pushed up by logit_bias) while a
    sibling goes on used to free the slot the sibling was then forked from and kill the engine."""
    prompts = [mixed_prompts()[i % 9] for i in range(24)]
    params = [SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=8 + i, logit_bias={EOS: 6.0}) for i in range(24)]
    core = make_core()
    out = run(core, prompts, params)  # checks the invariants after every step, and that all is free
    hits = [i for i in range(24) if out[f"r{i}"][0] == [EOS] and len(out[f"r{i}"][1]) > 1]
    assert hits  # the case happened
    for i in hits[:2]:  # and each choice is what a separate request with that choice's seed gives
        for c in range(2):
            alone = SamplingParams(max_tokens=4, temperature=1.0, seed=choice_seed(8 + i, c), logit_bias={EOS: 6.0})
            assert run(core, [prompts[i]], [alone])["r0"][0] == out[f"r{i}"][c]


def test_random_workloads_keep_the_engine_consistent(make_core):
    """The real engine under a seeded random mix: n in 1..3, stop tokens made likely, aborts of
    requests and of single choices mid-flight, a pool small enough to preempt; invariants after
    every step, everything free at the end."""
    rng = random.Random(5)
    core = make_core(num_blocks=12, max_num_seqs=6, max_num_batched_tokens=24)
    prompts = mixed_prompts(40, seed=9)
    live = []
    for i in range(120):
        if i < 80 and rng.random() < 0.5:
            params = SamplingParams(n=rng.randint(1, 3), max_tokens=rng.randint(1, 24), temperature=rng.choice([0, 1.0]),
                                    seed=i, logit_bias={EOS: rng.choice([0.0, 4.0])})
            core.add_request(f"q{i}", prompts[i % 40][:40], params)
            live.append(f"q{i}")
        if live and rng.random() < 0.08:
            core.abort(live.pop(rng.randrange(len(live))), None if rng.random() < 0.5 else [rng.randrange(3)])
        core.step()
        core.scheduler.check_invariants()
    while core.has_unfinished():
        core.step()
        core.scheduler.check_invariants()
    assert_all_free(core)
    assert core.scheduler.num_preemptions_total > 0


def test_min_tokens_and_stop_token_ids(make_core):
    prompt = mixed_prompts()[3]
    free = run(make_core(), [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))["r0"][0]
    stop_at = free[2]
    first = free.index(stop_at)
    stopped = run(make_core(), [prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))["r0"][0]
    assert stopped == free[: first + 1]  # ends on the stop token, which is included in token ids
    core = make_core()
    core.add_request("m", prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at], min_tokens=first + 2))
    tokens, last = [], None
    while core.has_unfinished():
        for out in core.step():
            tokens += out.deltas[0].token_ids
            last = out.deltas[0]
    assert stop_at not in tokens[: first + 2]  # suppressed until min_tokens
    assert len(tokens) >= first + 2
    assert last.finish_reason in ("stop", "length")


def test_eos_stops_unless_ignore_eos(make_core, tiny_config):
    core = make_core()
    prompt = mixed_prompts()[4]
    free = run(core, [prompt], GREEDY)["r0"][0]
    eos = free[1]
    core = EngineCore(core.config, tiny_config, model=core.runner.model, extra_stop_token_ids=(eos,))
    stopped = run(core, [prompt], SamplingParams(temperature=0, max_tokens=12))["r0"][0]
    assert stopped == free[: free.index(eos) + 1]
    assert run(core, [prompt], GREEDY)["r0"][0] == free


@pytest.mark.parametrize("caching", [True, False])
def test_aborts_and_finishes_free_every_block_and_slot(make_core, caching):
    prompts = mixed_prompts(20, seed=3)
    core = make_core(num_blocks=24, max_num_seqs=8, max_num_batched_tokens=32,  # tight: preemptions
                     enable_prefix_caching=caching)
    params = [SamplingParams(temperature=0, max_tokens=random.Random(i).randint(1, 20), n=1 + i % 3, ignore_eos=True)
              for i in range(20)]
    aborts = {f"r{i}": i for i in range(0, 20, 3)}  # some waiting, some mid-prefill, some decoding
    out = run(core, prompts, params, aborts=aborts)
    assert core.scheduler.num_preemptions_total > 0
    for i in range(20):
        if f"r{i}" not in aborts:
            assert all(len(t) == params[i].max_tokens for t in out[f"r{i}"])


def test_requests_that_can_never_fit_are_rejected(make_core):
    core = make_core(num_blocks=20)  # 320 tokens of KV, max_model_len 256
    with pytest.raises(ValueError, match="maximum context length"):
        core.add_request("a", [5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        core.add_request("b", [5], SamplingParams(logit_bias={10_000: 1.0}))
    with pytest.raises(ValueError, match="prompt token ids"):
        core.add_request("c", [100_000], SamplingParams())
    core.add_request("d", [5] * 200, SamplingParams(max_tokens=None, temperature=0))  # up to max_model_len
    assert core.scheduler.groups["d"][0].max_tokens == 56
    assert not core.scheduler.waiting[1:]


def test_thinking_budget_forces_the_end_token(make_core):
    prompt = mixed_prompts()[4]
    free = run(make_core(), [prompt], GREEDY)["r0"][0]
    end = 13  # </think> in the tiny tokenizer
    assert end not in free[:3]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_budget=3, thinking_end_token_id=end)
    forced = run(make_core(), [prompt], params)["r0"][0]
    assert forced[:3] == free[:3] and forced[3] == end
    assert forced[4:] != [end] * 8  # reasoning closed: no more forcing, the model runs free again


def test_16_bit_ssm_state_and_stats(tiny_config, tiny_model):
    from hybridserve.config import EngineConfig

    config = EngineConfig(model="tiny", device="cpu", max_model_len=256, max_num_seqs=4,
                          mamba_ssm_cache_dtype="bfloat16", cpu_cache_bytes=4 << 20, enable_prefix_caching=False,
                          async_scheduling=False)  # the stats after exactly one applied step
    core = EngineCore(config, tiny_config, model=tiny_model)
    assert core.runner.cache.ssm_state.dtype == torch.bfloat16
    core.add_request("a", mixed_prompts()[6], GREEDY)
    core.add_request("b", mixed_prompts()[7], GREEDY)
    core.step()
    st = core.stats()
    assert (st.num_running, st.num_waiting, st.num_slots, st.num_free_slots) == (2, 0, 4, 2)
    assert st.num_blocks - st.num_free_blocks == 3 + 4  # 33 and 64 prompt tokens of KV, 16 per block
    assert st.kv_cache_usage == pytest.approx(7 / st.num_blocks) and st.state_slot_usage == 0.5
    assert st.prompt_tokens_total == 33 + 64 and st.generation_tokens_total == 2
    while core.has_unfinished():
        core.step()
    assert core.stats().generation_tokens_total == 24
    assert_all_free(core)


def test_memory_split_lets_every_slot_reach_max_model_len(tiny_config, tiny_model):
    """More sequences asked for than fit: slots shrink so each one keeps KV for a full-length sequence
    (a slot without KV to grow into would only thrash through preemptions)."""
    from hybridserve.config import EngineConfig

    slot = HybridCache.bytes_per_slot(tiny_config, torch.float32, torch.float32)
    block = HybridCache.bytes_per_block(tiny_config, 16, torch.float32)
    per_seq = slot + (256 // 16) * block
    config = EngineConfig(model="tiny", device="cpu", max_model_len=256, max_num_seqs=32,
                          cpu_cache_bytes=10 * per_seq + slot + block, enable_prefix_caching=False)
    runner = EngineCore(config, tiny_config, model=tiny_model).runner
    assert runner.layout.num_slots == 10 and runner.layout.num_snapshots == 0
    assert runner.layout.num_blocks * 16 >= runner.layout.num_slots * 256
    # prefix-cache snapshots are state rows too: counted like slots, before the split
    config = EngineConfig(model="tiny", device="cpu", max_model_len=256, max_num_seqs=32, prefix_cache_snapshots=5,
                          cpu_cache_bytes=10 * per_seq + 6 * slot + block)
    runner = EngineCore(config, tiny_config, model=tiny_model).runner
    assert (runner.layout.num_slots, runner.layout.num_snapshots) == (10, 5)
    assert runner.cache.ssm_state.shape[1] == 10 + 1 + 5


def test_outputs_report_how_long_a_request_queued(make_core):
    core = make_core(max_num_seqs=1)  # the second request waits for the first one's slot
    core.add_request("first", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    core.add_request("second", [8, 9], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    queue_times: dict[str, set] = {"first": set(), "second": set()}
    while core.has_unfinished():
        for out in core.step():
            queue_times[out.request_id].add(out.queue_time)
    (first,), (second,) = queue_times["first"], queue_times["second"]  # one value, on every output
    assert first is not None and second is not None and 0 <= first < second
