"""Output processing on the API side: UTF-8-safe incremental text, stop strings (trimmed, held back
while forming), n > 1 aggregation, logprobs and errors."""

from __future__ import annotations

import pytest

from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.output_processor import OutputProcessor
from hybridserve.engine.outputs import EngineOutput, SequenceDelta, TokenLogprob
from hybridserve.sampling_params import SamplingParams
from hybridserve.tokenizer import load_tokenizer

TEXT = "Hello wörld, ünïcode ✓ test"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def feed(processor, rid, tokens, index=0, finish_at_end=None, stop_reason=None):
    """Send tokens one engine step at a time; returns the RequestOutputs and stop-string aborts."""
    outs, aborts = [], []
    for i, t in enumerate(tokens):
        last = i == len(tokens) - 1
        delta = SequenceDelta(index, [t], finish_reason=finish_at_end if last else None,
                              stop_reason=stop_reason if last else None)
        out, stopped = processor.process(EngineOutput(rid, [delta], finished=bool(finish_at_end and last)))
        aborts += stopped
        if out is not None:
            outs.append(out)
    return outs, aborts


def test_incremental_detokenizer_never_splits_characters(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[57])
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == TEXT == detok.text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a character split over two tokens waits for its second half


def test_deltas_add_up_and_the_last_output_is_finished(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    proc = OutputProcessor(tokenizer)
    proc.add_request("a", [57], SamplingParams())
    outs, aborts = feed(proc, "a", ids, finish_at_end="length")
    assert not aborts
    assert "".join(o.outputs[0].text_delta for o in outs) == TEXT == outs[-1].outputs[0].text
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert outs[-1].outputs[0].token_ids == ids
    assert [t for o in outs for t in o.outputs[0].token_ids_delta] == ids
    assert "a" not in proc.requests


def test_stop_string_trims_the_text_holds_back_the_stream_and_asks_for_abort(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    proc = OutputProcessor(tokenizer)
    proc.add_request("a", [57], SamplingParams(stop=["code", "zzz"]))
    outs, aborts = feed(proc, "a", ids)
    final = outs[-1]
    assert final.finished and aborts == [0]
    assert final.outputs[0].text == "Hello wörld, ünï"
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == "code"
    streamed = "".join(o.outputs[0].text_delta for o in outs)
    assert streamed == final.outputs[0].text
    # while "c", "co", "cod" arrive nothing of a possible stop string is streamed
    assert all(not o.outputs[0].text.endswith(("c", "co", "cod")) for o in outs)
    # tokens after the stop are ignored (the request is gone)
    assert proc.process(EngineOutput("a", [SequenceDelta(0, [5])], finished=False)) == (None, [])

    proc.add_request("b", [57], SamplingParams(stop=["code"], include_stop_str_in_output=True))
    outs, _ = feed(proc, "b", ids)
    assert outs[-1].outputs[0].text == "Hello wörld, ünïcode"


def test_stop_token_text_is_not_in_the_output(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    stop_id = tokenizer.encode("!", add_special_tokens=False)[0]
    proc = OutputProcessor(tokenizer)
    proc.add_request("a", [57], SamplingParams(stop_token_ids=[stop_id]))
    outs, _ = feed(proc, "a", ids + [stop_id], finish_at_end="stop", stop_reason=stop_id)
    assert outs[-1].outputs[0].text == "Hi there"
    assert outs[-1].outputs[0].token_ids == ids + [stop_id]
    assert outs[-1].outputs[0].stop_reason == stop_id


def test_n_choices_are_gathered_and_finish_together(tokenizer):
    proc = OutputProcessor(tokenizer)
    proc.add_request("a", [57], SamplingParams(n=2, logprobs=1))
    lp = [TokenLogprob(86, -0.5, 1), TokenLogprob(86, -0.5, 1)]
    out, _ = proc.process(EngineOutput("a", [SequenceDelta(0, [86], [lp]), SequenceDelta(1, [343], [lp])], False))
    assert [c.text for c in out.outputs] == ["e", "ll"] and not out.finished
    out, _ = proc.process(EngineOutput("a", [SequenceDelta(0, [96], [lp], finish_reason="length")], False))
    assert out.outputs[0].finished and not out.outputs[1].finished and not out.finished
    assert out.outputs[1].text_delta == "" and out.outputs[1].token_ids_delta == []
    out, _ = proc.process(EngineOutput("a", [SequenceDelta(1, [96], [lp], finish_reason="length")], True))
    assert out.finished and [c.text for c in out.outputs] == ["eo", "llo"]
    assert len(out.outputs[0].logprobs) == 2 and out.outputs[0].logprobs[0][0].logprob == -0.5


def test_engine_error_ends_the_request(tokenizer):
    proc = OutputProcessor(tokenizer)
    proc.add_request("a", [57], SamplingParams())
    out, _ = proc.process(EngineOutput("a", [], finished=True, error="boom"))
    assert out.finished and out.error == "boom" and out.outputs[0].finish_reason == "error"


def test_min_tokens_holds_back_stop_strings(tokenizer):
    """A stop string inside the first min_tokens tokens does not stop the choice (vLLM); one after does."""
    ids = tokenizer.encode("ab ab cd ab", add_special_tokens=False)
    min_tokens = len(tokenizer.encode("ab ab c", add_special_tokens=False))  # both early "ab"s are inside
    proc = OutputProcessor(tokenizer)
    proc.add_request("m", [57], SamplingParams(stop=["ab"], min_tokens=min_tokens))
    outs, aborts = feed(proc, "m", ids, finish_at_end="length")
    final = outs[-1].outputs[0]
    assert aborts == [0] and final.finish_reason == "stop" and final.stop_reason == "ab"
    assert final.text == "ab ab cd "
    proc.add_request("n", [57], SamplingParams(stop=["ab"]))  # without min_tokens: stops at once
    outs, aborts = feed(proc, "n", ids, finish_at_end="length")
    assert aborts == [0] and outs[-1].outputs[0].text == ""
