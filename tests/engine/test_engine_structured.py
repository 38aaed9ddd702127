"""Structured outputs in the engine, on the tiny model whose random weights write noise without a
grammar: every output validates (greedy and sampled, n > 1, under preemption, with a thinking
budget), grammars compile off the loop and are cached, and aborts or failures free everything."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from hybridserve.engine.request import Request
from hybridserve.engine.sampler import Sampler, SamplingMetadata
from hybridserve.engine.step_plan import SamplingInputs
from hybridserve.sampling_params import SamplingParams
from hybridserve.serve.chat_output import ChatOutputParser, ChoiceAccumulator
from hybridserve.structured import grammars as G
from hybridserve.structured.bitmask import fill_bitmasks
from hybridserve.structured.compiler import GrammarCompiler
from hybridserve.structured.spec import StructuredSpec
from hybridserve.structured.tool_grammar import tool_call_grammar
from hybridserve.tokenizer import load_tokenizer
from tests.engine.test_engine_core import assert_all_free, mixed_prompts, run
from tests.structured.conftest import SCHEMAS
from tests.structured.test_tool_grammar import SCHEMAS as TOOL_SCHEMAS
from tests.structured.test_tool_grammar import TOOLS

TOKENIZER = load_tokenizer("tiny")
MAX_LEN = 1024


def text(tokens: list[int]) -> str:
    return TOKENIZER.decode([t for t in tokens if t != 2])


def json_params(schema, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 200)
    return SamplingParams(structured=G.build_spec(G.json_schema(schema), "json"), **kw)


def test_every_output_validates_against_its_schema(make_core):
    core = make_core(max_model_len=MAX_LEN)
    prompts = mixed_prompts(8, seed=1)
    cases = [(name, p, json_params(SCHEMAS[name], temperature=t, seed=s))
             for name in sorted(SCHEMAS) for p in prompts for t, s in ((0, None), (1.0, 7))]
    out = run(core, [p for _, p, _ in cases], [params for _, _, params in cases])
    for i, (name, _, _) in enumerate(cases):
        value = json.loads(text(out[f"r{i}"][0]))
        jsonschema.validate(value, SCHEMAS[name])


def test_without_a_grammar_the_model_writes_noise(make_core):
    """The control for the test above: the same prompts give no JSON at all."""
    out = run(make_core(max_model_len=MAX_LEN), mixed_prompts(8, seed=1), SamplingParams(temperature=0, max_tokens=40))
    for tokens in out.values():
        with pytest.raises(ValueError):
            json.loads(text(tokens[0]))


def test_n_choices_each_follow_the_grammar(make_core):
    schema = SCHEMAS["bounded_array"]
    out = run(make_core(max_model_len=MAX_LEN), mixed_prompts(3), json_params(schema, n=4, temperature=1.0, seed=3))
    for choices in out.values():
        values = [json.loads(text(c)) for c in choices]
        for v in values:
            jsonschema.validate(v, schema)
    assert len({text(c) for choices in out.values() for c in choices}) > 3


def test_preempted_sequences_keep_their_grammar_state(make_core):
    core = make_core(num_blocks=24, max_num_seqs=8, max_model_len=MAX_LEN)
    schema = SCHEMAS["defs_and_refs"]
    prompts = mixed_prompts(8, seed=2)
    out = run(core, prompts, json_params(schema, temperature=1.0, seed=11))
    assert core.scheduler.num_preemptions_total > 0, "the cache should be too small for all at once"
    for tokens in out.values():
        jsonschema.validate(json.loads(text(tokens[0])), schema)
    # and the same outputs as without preemption (seeded sampling depends on positions only)
    roomy = run(make_core(max_model_len=MAX_LEN), prompts, json_params(schema, temperature=1.0, seed=11))
    assert roomy == out


def test_thinking_budget_closes_reasoning_then_the_answer_follows(make_core):
    markers = G.Markers.of(TOKENIZER)
    think_end = markers.token_ids[G.THINK_END]
    schema = SCHEMAS["optional_fields"]
    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=200, thinking_budget=6, thinking_end_token_id=think_end,
        thinking_grace_tokens=3, newline_token_ids=[], thinking_implicit_end_token_ids=[markers.token_ids["<tool_call>"]],
        structured=G.build_spec(G.json_schema(schema), "json", reasoning=True, markers=markers))
    out = run(make_core(max_model_len=MAX_LEN), mixed_prompts(6), params)
    for tokens in out.values():
        tokens = tokens[0]
        assert think_end in tokens[: 6 + 3 + 4]  # at the budget, or a few tokens later (mid-character)
        cut = tokens.index(think_end)
        jsonschema.validate(json.loads(text(tokens[cut + 1:])), schema)


def test_required_tool_calls_validate(make_core):
    markers = G.Markers.of(TOKENIZER)
    spec = G.build_spec(tool_call_grammar(TOOLS, markers=markers), "tool_call")
    out = run(make_core(max_model_len=MAX_LEN), mixed_prompts(6), [SamplingParams(temperature=t, seed=s, max_tokens=400, structured=spec)
                                              for t, s in ((0, None), (1.0, 1), (1.0, 2))] * 2)
    for tokens in out.values():
        acc = ChoiceAccumulator()
        acc.add(ChatOutputParser(False, TOOLS).feed(text(tokens[0]), final=True))
        assert acc.tool_calls and acc.content == ""
        for call in acc.tool_calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL_SCHEMAS[call["function"]["name"]])


def test_grammars_are_cached_and_compiled_off_the_loop(make_core):
    core = make_core(max_model_len=MAX_LEN)
    spec = G.build_spec(G.json_schema(SCHEMAS["nested"]), "json")
    compiler = core.grammars.compiler
    assert compiler.submit(spec) is compiler.submit(StructuredSpec(spec.grammar, "json"))
    # a request without a grammar runs while a structured one waits for its compile
    core.add_request("plain", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    core.add_request("structured", [5, 6, 7], SamplingParams(max_tokens=100, structured=G.build_spec(
        G.regex("[a-z]{3,40}"), "regex")))
    assert "structured" in core.grammars and core.stats().num_waiting >= 1
    done = set()
    while core.has_unfinished():
        done |= {o.request_id for o in core.step() if o.finished}
    assert done == {"plain", "structured"}
    assert_all_free(core)


def test_abort_while_compiling_and_compile_failures(make_core):
    core = make_core(max_model_len=MAX_LEN)
    core.add_request("a", [5, 6], SamplingParams(n=2, structured=G.build_spec(G.regex("[0-9]{1,9}x"), "regex")))
    out = core.abort("a", [1])
    assert [d.index for d in out.deltas] == [1] and not out.finished
    out = core.abort("a")
    assert [d.finish_reason for d in out.deltas] == ["abort"] and out.finished and not core.has_unfinished()
    core.add_request("bad", [5, 6], SamplingParams(structured=StructuredSpec('{"grammars": [{"lark_grammar": '
                                                                              '"start: nowhere"}]}', "grammar")))
    outs = []
    while core.has_unfinished():
        outs += core.step()
    assert outs[0].finished and "cannot be compiled" in outs[0].error
    assert_all_free(core)


def test_stop_strings_cut_structured_output(tiny_model):
    from hybridserve import LLM

    llm = LLM(model="tiny", model_instance=tiny_model, device="cpu", max_model_len=512)
    schema = SCHEMAS["nested"]
    full = llm.generate(["Hello"], json_params(schema, temperature=0))[0].outputs[0]
    cut = llm.generate(["Hello"], json_params(schema, temperature=0, stop=['"age"']))[0].outputs[0]
    assert cut.finish_reason == "stop" and full.text.startswith(cut.text) and cut.text == full.text[
        : full.text.index('"age"')]
    assert not llm.engine.has_unfinished()


def test_sampler_applies_the_masks_and_defers_forbidden_forced_tokens():
    compiler = GrammarCompiler(TOKENIZER, 512, [2])
    grammar = compiler.submit(G.build_spec(G.choice(["ab", "ba"]), "choice")).result()

    def row(with_grammar: bool, forced: int | None = None) -> Request:
        params = SamplingParams(temperature=0, min_tokens=5, thinking_budget=None if forced is None else 0,
                                thinking_end_token_id=forced)
        r = Request("r", [1], params, max_tokens=10, stop_token_ids=frozenset({2}))
        r.grammar = grammar.matcher() if with_grammar else None
        return r

    a, b = (TOKENIZER.encode(c, add_special_tokens=False)[0] for c in "ab")
    logits = torch.zeros(3, 512)
    logits[:, 300] = 10.0  # the model's favourite, forbidden by the grammar
    rows = [row(True), row(False), row(True, forced=300)]
    inputs = SamplingInputs.of(rows, [0, 1, 2])
    assert inputs.forced.tolist() == [-1, -1, 300] and inputs.suppress[0] == [1]  # min_tokens only without grammar
    bitmasks = fill_bitmasks([r.grammar for r in rows], torch.device("cpu"))
    bitmasks.defer_forbidden(inputs.forced)
    assert inputs.forced.tolist() == [-1, -1, -1]  # row 2's forced 300 waits: its grammar forbids it
    picked = Sampler("cpu")(logits, SamplingMetadata.build(inputs, torch.device("cpu"), bitmasks)).token_ids.tolist()
    assert picked[0] in (a, b) and picked[1] == 300 and picked[2] in (a, b)
    compiler.shutdown()


@pytest.mark.parametrize("vocab", [37, 512])
def test_reference_bitmask_matches_a_loop(vocab):
    from hybridserve.ops.reference.sampling import apply_token_bitmask

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=gen)
    words = (vocab + 31) // 32
    masks = torch.randint(-(2**31), 2**31, (2, words), generator=gen, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([3, 1])
    want = logits.clone()
    for k, r in enumerate(rows.tolist()):
        for t in range(vocab):
            if not (int(masks[k, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    apply_token_bitmask(logits, rows, masks)
    torch.testing.assert_close(logits, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_on_the_gpu_outputs_validate_with_and_without_decode_graphs(tiny_config, enforce_eager):
    """The Triton bitmask kernel and pinned mask copies, under CUDA-graph decode steps or eager ones."""
    from hybridserve.config import EngineConfig
    from hybridserve.engine.engine_core import EngineCore

    config = EngineConfig(model="tiny", device="cuda", max_model_len=MAX_LEN, gpu_memory_utilization=0.2,
                          max_num_batched_tokens=1024, enforce_eager=enforce_eager)
    core = EngineCore(config, tiny_config)
    cases = [(name, json_params(SCHEMAS[name], temperature=t, seed=s, n=2))
             for name in sorted(SCHEMAS) for t, s in ((0, None), (1.0, 9))]
    out = run(core, mixed_prompts(len(cases), seed=4), [params for _, params in cases])
    for i, (name, _) in enumerate(cases):
        for choice in out[f"r{i}"]:
            jsonschema.validate(json.loads(text(choice)), SCHEMAS[name])
