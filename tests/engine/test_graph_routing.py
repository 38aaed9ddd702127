"""The CUDA-graph routing and padding of `StepGraphs`, through the engine on CPU: every step a graph
would run (pure decodes padded to a batch size, prefill / mixed steps padded to a token size with
empty sequences, in the narrow family or, past 32 sequences, a wide one) runs here eagerly on the graphs' padded static inputs and shared logits buffer,
and the tokens equal plain eager steps', greedy and seeded, with chunked prompts, n > 1 forks,
prompt logprobs and prefix-cache snapshots (those steps fall back to eager). The capture itself
needs a GPU (tests/engine/test_engine_gpu.py)."""

from __future__ import annotations

from hybridserve.config import EngineConfig
from hybridserve.engine.cuda_graphs import MAX_SEQS, PrefillGraphs, StepGraphs
from hybridserve.engine.engine_core import EngineCore
from hybridserve.sampling_params import SamplingParams
from tests.engine.test_engine_core import mixed_prompts, run


class PaddedEagerGraphs(StepGraphs):
    """StepGraphs' routing and padding without capturing: a "replay" runs the padded batch eagerly.
    Counts the steps each family ran."""

    def __init__(self, runner, max_prefill_tokens: int) -> None:
        super().__init__(runner.model, runner.cache, max_decode_batch=runner.max_graph_batch,
                         max_prefill_tokens=max_prefill_tokens,
                         prefill_while_decoding=runner.config.max_prefill_tokens_while_decoding,
                         max_blocks_per_seq=runner.max_blocks_per_seq, pad_slot=runner.pad_slot,
                         pad_block=runner.pad_block)

    def _capture(self) -> None:  # nothing to capture: each family's replay runs eagerly
        self.logits.fill_(float("nan"))  # a row the step does not write stays NaN
        self.replays = {"decode": 0, **{f"prefill {f.max_seqs}": 0 for f in self.prefill}}
        for family in (self.decode, *self.prefill):
            name = f"prefill {family.max_seqs}" if isinstance(family, PrefillGraphs) else "decode"
            family.replay = self._eager(name, family)

    def _eager(self, name, family):
        def replay(batch, n):
            g = family.size_for(n)
            family._fill(batch, g)
            padded = family._batch(g)
            self.model(padded, self.cache, self.logits[: padded.logits_indices.shape[0]])
            self.replays[name] += 1

        return replay


def engine(tiny_config, graphs: bool, **fields) -> EngineCore:
    config = EngineConfig(model="tiny", device="cpu", max_model_len=256, max_num_batched_tokens=200, **fields)
    core = EngineCore(config, tiny_config)
    if graphs:
        core.runner.graphs = PaddedEagerGraphs(core.runner, 200)
    return core


PROMPTS = [p * 2 for p in mixed_prompts(24, seed=5)]  # up to 180 tokens: chunked over several steps
PARAMS = [SamplingParams(temperature=0.8 * (i % 2), top_p=0.9, seed=i, n=1 + i % 3, max_tokens=4 + i % 9,
                         ignore_eos=True, prompt_logprobs=2 if i == 5 else None) for i in range(24)]


def test_padded_graph_steps_give_the_eager_tokens(tiny_config):
    expected = run(engine(tiny_config, False, enable_prefix_caching=False), PROMPTS, PARAMS)
    core = engine(tiny_config, True, enable_prefix_caching=False)
    assert run(core, PROMPTS, PARAMS) == expected
    replays = core.runner.graphs.replays
    wide = sum(n for name, n in replays.items() if name not in ("decode", f"prefill {MAX_SEQS}"))
    assert replays["decode"] >= 5 and replays[f"prefill {MAX_SEQS}"] >= 5 and wide >= 2, replays  # forks: > 32 sequences


def test_padded_graph_steps_with_prefix_caching(tiny_config):
    """Misses capture prefix-cache snapshots (eager steps); the second wave's prompts extend the
    first's and hit, resuming from snapshots (graph steps)."""
    first = [p[:60] for p in PROMPTS]
    second = [p + q[:20] for p, q in zip(first, reversed(PROMPTS))]

    def waves(core):
        return run(core, first, PARAMS), run(core, second, PARAMS), core.scheduler.cache.hits_total

    expected = waves(engine(tiny_config, False, prefix_cache_snapshots=128))  # none evicted
    core = engine(tiny_config, True, prefix_cache_snapshots=128)
    got = waves(core)
    assert got == expected and got[2] > 0  # the second wave hit
    replays = core.runner.graphs.replays
    assert sum(n for name, n in replays.items() if name != "decode") >= 1, replays  # steps without a capture
