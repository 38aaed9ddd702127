"""The offline API: `from hybridserve import LLM, SamplingParams`, the vLLM-shaped outputs, stop
strings end generation and free the engine, and the `generate` subcommand."""

from __future__ import annotations

import json

import pytest

from hybridserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM("tiny", device="cpu", max_model_len=256, model_instance=tiny_model)


def test_generate_strings_and_token_ids(llm):
    prompts = ["Hello world", "The quick brown fox jumps", [57, 86, 343]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.prompt for o in outs] == ["Hello world", "The quick brown fox jumps", None]
    assert outs[2].prompt_token_ids == [57, 86, 343]
    for o in outs:
        (choice,) = o.outputs
        assert o.finished and choice.finish_reason == "length" and len(choice.token_ids) == 10
        assert choice.text == llm.tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    alone = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert alone[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_stop_strings_trim_and_abort(llm):
    base = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = base.text[6:9]
    assert len(base.text) > 12 and stop not in base.text[:6]
    out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True))
    choice = out[0].outputs[0]
    assert choice.text == base.text[: base.text.index(stop)]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert len(choice.token_ids) < 24
    sched = llm.engine.scheduler
    assert not sched.groups and sched.cache.block_pool.num_free == sched.layout.num_blocks
    sched.check_invariants()


def test_n_choices_and_per_prompt_params(llm):
    outs = llm.generate(
        ["Hello world", "Hi"],
        [SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True),
         SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)],
    )
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) == 3
    assert len(outs[1].outputs) == 1 and len(outs[1].outputs[0].token_ids) == 4
    again = llm.generate("Hello world", SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True))
    assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in outs[0].outputs]


def test_invalid_requests_fail_before_running(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate("Hello", SamplingParams(max_tokens=1000))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt token ids"):  # the bad prompt is second: the first stays out too
        llm.generate([[5, 6, 7], [10**7]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_generate_subcommand(tmp_path, capsys):
    from hybridserve.cli import main

    out_file = tmp_path / "out.jsonl"
    code = main(["generate", "tiny", "--device", "cpu", "--max-model-len", "128", "--prompt", "Hello",
                 "--prompt", "World", "--max-tokens", "5", "--ignore-eos", "--output", str(out_file)])
    assert code == 0
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "World"]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in records)
    assert main(["generate", "tiny", "--device", "cpu"]) == 2  # no prompt
    capsys.readouterr()
    assert main(["generate", "tiny", "--device", "cpu", "--max-model-len", "128", "--prompt", "Hello",
                 "--max-tokens", "3", "--n", "2", "--temperature", "0.7", "--sampling-seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "--- 'Hello' [0] (" in printed and "--- 'Hello' [1] (" in printed
