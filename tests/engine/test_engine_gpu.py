"""The engine on a GPU (skipped without CUDA): decode and prefill CUDA graphs give the same tokens as
eager steps, across graph sizes, padding and preemption, and the memory budget sizes the caches."""

from __future__ import annotations

import gc

import pytest
import torch

from hybridserve.config import EngineConfig
from hybridserve.engine.engine_core import EngineCore
from hybridserve.sampling_params import SamplingParams
from tests.engine.test_engine_core import mixed_prompts, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = mixed_prompts(40)
GREEDY = [SamplingParams(temperature=0, max_tokens=5 + i % 17, ignore_eos=True) for i in range(40)]
SAMPLED = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=8, ignore_eos=True) for i in range(40)]


def with_core(tiny_config, fn, **fields):
    """Build a GPU engine, call fn(core), free the engine (the next one's budget counts what is in use).
    4,096 KV blocks unless given (None: as many as fit): the per-step invariant checks walk them all."""
    settings = dict(model="tiny", device="cuda", max_model_len=256, gpu_memory_utilization=0.2,
                    max_num_batched_tokens=512, num_kv_blocks=4096)
    config = EngineConfig(**{**settings, **fields})
    core = EngineCore(config, tiny_config)
    try:
        return fn(core)
    finally:
        del core
        gc.collect()
        torch.cuda.empty_cache()


def test_decode_graphs_match_eager_steps(tiny_config):
    def eager_run(core):
        assert core.runner.graphs is None
        return run(core, PROMPTS, GREEDY), run(core, PROMPTS, SAMPLED)

    def graphed_run(core):
        graphs = core.runner.graphs.decode
        assert graphs.sizes == [1, 2, 4, 8, 16, 32, 40]
        replays = count_replays(graphs)
        out = run(core, PROMPTS, GREEDY), run(core, PROMPTS, SAMPLED)
        assert sum(replays.values()) > 10 and sum(1 for v in replays.values() if v) >= 3  # several padded sizes
        return out

    expected = with_core(tiny_config, eager_run, enforce_eager=True, max_num_seqs=40)
    assert with_core(tiny_config, graphed_run, max_num_seqs=40) == expected


def count_replays(family) -> dict[int, int]:
    """Graph size -> replays so far, of one family of graphs (counted from now on)."""
    replays = dict.fromkeys(family.sizes, 0)
    for g, graph in family.graphs.items():
        def counted(g=g, original=graph.replay):
            replays[g] += 1
            original()

        graph.replay = counted
    return replays


def test_prefill_graphs_match_eager_steps(tiny_config):
    """Prefill and mixed steps of up to 32 sequences run as padded CUDA graphs (chunked prompts that
    continue their state, decodes beside them, several sizes) and give the eager steps' tokens."""
    prompts = [p * 2 for p in PROMPTS[:24]]  # up to 180 tokens: prompts chunked over several steps
    fields = dict(max_num_seqs=24, max_num_batched_tokens=200, enable_prefix_caching=False)

    def graphed_run(core):
        assert len(core.runner.graphs.prefill) == 1  # no batch past 32 sequences: the narrow family only
        graphs = core.runner.graphs.prefill[0]
        assert graphs.sizes == [64, 128, 192, 200]  # no step has more than max_num_batched_tokens
        replays = count_replays(graphs)
        out = run(core, prompts, GREEDY[:24]), run(core, prompts, SAMPLED[:24])
        assert sum(replays.values()) >= 6 and sum(1 for v in replays.values() if v) >= 2, replays
        return out

    expected = with_core(tiny_config, lambda core: (run(core, prompts, GREEDY[:24]), run(core, prompts, SAMPLED[:24])),
                         enforce_eager=True, **fields)
    assert with_core(tiny_config, graphed_run, **fields) == expected


def test_wide_mixed_graphs_match_eager_steps(tiny_config):
    """Mixed steps of more than 32 sequences (decodes beside prompt chunks) run in the wide family's
    graphs, padded with empty sequences, and give the eager steps' tokens."""
    fields = dict(max_num_seqs=40, enable_prefix_caching=False)

    def graphed_run(core):
        narrow, wide = core.runner.graphs.prefill
        assert (narrow.max_seqs, wide.max_seqs, wide.sizes) == (32, 40, [256, 512])
        replays = count_replays(wide)
        out = run(core, PROMPTS, GREEDY), run(core, PROMPTS, SAMPLED)
        assert sum(replays.values()) >= 2, replays
        return out

    expected = with_core(tiny_config, lambda core: (run(core, PROMPTS, GREEDY), run(core, PROMPTS, SAMPLED)),
                         enforce_eager=True, **fields)
    assert with_core(tiny_config, graphed_run, **fields) == expected


def test_graphs_under_preemption_and_memory_sizing(tiny_config):
    prompts = PROMPTS[:16]
    expected = with_core(tiny_config, lambda core: run(core, prompts), max_num_seqs=16, enforce_eager=True)

    def sized(core):
        assert core.layout.num_slots == 16 and core.layout.num_blocks > 1000  # 20 % of a GPU is plenty for the tiny model

    with_core(tiny_config, sized, max_num_seqs=16, num_kv_blocks=None)

    def tight_run(core):
        assert core.layout.num_blocks == 20  # only 20 blocks in play: preemption
        out = run(core, prompts)
        assert core.scheduler.num_preemptions_total > 0
        return out

    assert with_core(tiny_config, tight_run, max_num_seqs=16, num_kv_blocks=20) == expected


def test_n_choices_fork_on_the_gpu(tiny_config):
    """Forks (shared prompt blocks, copied tail block and slot) give the same tokens with graphs as eager."""
    params = [SamplingParams(temperature=1.0, seed=i, n=1 + i % 3, max_tokens=6, logit_bias={2: 3.0}) for i in range(40)]
    expected = with_core(tiny_config, lambda core: run(core, PROMPTS, params), max_num_seqs=40, enforce_eager=True)
    assert with_core(tiny_config, lambda core: run(core, PROMPTS, params), max_num_seqs=40) == expected


def test_async_scheduling_matches_sync_with_graphs(tiny_config):
    """Overlapped steps on the GPU (pinned non-blocking copies, graphs, sampled rows read from the
    device token buffer) give the synchronous engine's tokens, with n > 1, early stops and aborts."""
    from tests.engine.test_async_scheduling import count_overlapped_launches, drive

    params = [SamplingParams(temperature=0.8 * (i % 2), top_p=0.9, seed=i, n=1 + i % 3, max_tokens=4 + i % 9,
                             logprobs=2 if i % 4 == 0 else None) for i in range(40)]
    abort_after = {f"r{i}": 2 + i % 5 for i in range(0, 40, 7)}

    def drive_core(core):
        overlapped = count_overlapped_launches(core)
        tokens, ends, _ = drive(core, PROMPTS, params, abort_after=abort_after)
        return tokens, ends, overlapped[0] > 0

    sync = with_core(tiny_config, drive_core, max_num_seqs=48, async_scheduling=False)
    overlapped = with_core(tiny_config, drive_core, max_num_seqs=48, async_scheduling=True)
    assert overlapped[:2] == sync[:2] and overlapped[2] and not sync[2]


def test_prefix_cache_on_the_gpu(tiny_config):
    """Multi-turn replays and shared prefixes with decode graphs and the Triton kernels: the same
    tokens with prefix caching on and off, and each turn hits at the previous turn's final state."""
    from tests.engine.test_prefix_cache_engine import generate

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    system = PROMPTS[7] + PROMPTS[8]  # 154 tokens

    def replay(core):
        with torch.no_grad():  # make the context matter (see test_prefix_cache_engine.context_model)
            for name, p in core.runner.model.named_parameters():
                if name.endswith(("out_proj.weight", "o_proj.weight")):
                    p.mul_(10.0)
        answers, hits, history = [], [], list(system)
        for turn in range(4):
            history += PROMPTS[turn][:9]  # the user's next message
            (choices,), (cached,) = generate(core, [list(history)], greedy, tag=f"t{turn}-")
            hits.append((cached, len(history)))
            answers.append(choices[0])
            history += choices[0]
        shared, _ = generate(core, [system + p[:20] for p in PROMPTS[10:26]], SAMPLED[:16], tag="s")
        return answers, shared, hits

    on = with_core(tiny_config, replay, max_num_seqs=16, dtype="float32")
    off = with_core(tiny_config, replay, max_num_seqs=16, dtype="float32", enable_prefix_caching=False)
    assert on[:2] == off[:2]
    assert [c for c, _ in on[2]] == [0] + [n - 9 - 1 for _, n in on[2][1:]]  # all but the new message and one token
    assert all(c == 0 for c, _ in off[2])
