"""Guaranteed tool calls: random walks under the qwen3_coder tool grammar, parsed back by the server's
own parser, always give calls to listed functions whose arguments validate against their schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from hybridserve.serve.chat_output import ChatOutputParser, ChoiceAccumulator
from hybridserve.structured import grammars as G
from hybridserve.structured.tool_grammar import tool_call_grammar
from tests.structured.conftest import text_of

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["city", "unit"], "additionalProperties": False}}}
BOOKING = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object",
    "properties": {
        "guests": {"type": "array", "items": {"type": "string", "enum": ["ann", "bob"]}, "minItems": 1,
                   "maxItems": 2},
        "options": {"type": "object", "properties": {"late": {"type": "boolean"}}, "required": ["late"],
                    "additionalProperties": False},
        "price": {"type": ["number", "null"], "minimum": 0, "maximum": 99},
        "confirm": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["guests", "options", "confirm"], "additionalProperties": False}}}
NO_ARGS = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},
                                                                           "additionalProperties": False}}}
TOOLS = [WEATHER, BOOKING, NO_ARGS]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WALKS = 16


def calls_of(text: str, reasoning_open: bool = False) -> tuple[ChoiceAccumulator, list[dict]]:
    parser = ChatOutputParser(reasoning_open, TOOLS)
    acc = ChoiceAccumulator()
    acc.add(parser.feed(text, final=True))
    return acc, [{"name": c["function"]["name"], "args": json.loads(c["function"]["arguments"])}
                 for c in acc.tool_calls]


def spec(tokenizer, reasoning: bool = False, **kw):
    markers = G.Markers.of(tokenizer)
    return G.build_spec(tool_call_grammar(TOOLS, markers=markers, **kw), "tool_call", reasoning=reasoning,
                        markers=markers)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_valid(walk, tokenizer, parallel):
    s = spec(tokenizer, parallel=parallel)
    names = set()
    for seed in range(WALKS):
        tokens, complete = walk(s, seed, max_tokens=800)
        assert complete, f"walk {seed} did not finish"
        acc, calls = calls_of(text_of(tokenizer, tokens))
        assert calls and acc.content == ""
        assert len(calls) == 1 or parallel
        for call in calls:
            jsonschema.validate(call["args"], SCHEMAS[call["name"]])
            names.add(call["name"])
    assert len(names) >= 2, "the walks should reach several functions"


def test_named_function_only(walk, tokenizer):
    s = spec(tokenizer, function="book", parallel=False)
    for seed in range(WALKS):
        tokens, complete = walk(s, seed, max_tokens=800)
        assert complete
        _, calls = calls_of(text_of(tokenizer, tokens))
        assert [c["name"] for c in calls] == ["book"]
        jsonschema.validate(calls[0]["args"], SCHEMAS["book"])


def test_enum_values_are_exact(walk, tokenizer):
    """No stray whitespace around a value: the parser keeps all of it but one newline each side."""
    s = spec(tokenizer, function="get_weather", parallel=False)
    for seed in range(WALKS):
        text = text_of(tokenizer, walk(s, seed, max_tokens=800)[0])
        _, calls = calls_of(text)
        assert calls[0]["args"]["unit"] in ("celsius", "fahrenheit")
        assert "\r" not in text


def test_reasoning_then_call(walk, tokenizer):
    s = spec(tokenizer, reasoning=True, parallel=False)
    think_end = G.Markers.of(tokenizer).token_ids[G.THINK_END]
    budget = lambda tokens: think_end if len(tokens) >= 30 and think_end not in tokens else None
    for seed in range(WALKS):
        tokens, complete = walk(s, seed, max_tokens=1200, force=budget)
        assert complete
        acc, calls = calls_of(text_of(tokenizer, tokens), reasoning_open=True)
        assert len(calls) == 1 and acc.content == ""
        jsonschema.validate(calls[0]["args"], SCHEMAS[calls[0]["name"]])


def test_free_form_parameters(walk, tokenizer):
    tools = [{"type": "function", "function": {"name": "anything", "parameters": {"type": "object"}}}]
    markers = G.Markers.of(tokenizer)
    s = G.build_spec(tool_call_grammar(tools, markers=markers, parallel=False), "tool_call")
    for seed in range(4):
        tokens, complete = walk(s, seed, max_tokens=800)
        if complete:
            parser = ChatOutputParser(False, tools)
            acc = ChoiceAccumulator()
            acc.add(parser.feed(text_of(tokenizer, tokens), final=True))
            assert [c["function"]["name"] for c in acc.tool_calls] == ["anything"]
            assert all(isinstance(v, str) for v in json.loads(acc.tool_calls[0]["function"]["arguments"]).values())


@pytest.mark.parametrize("tools,message", [
    ([{"type": "function", "function": {"name": "bad name"}}], "cannot be written"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a<b": {}}}}}], "a<b"),
])
def test_unwritable_names_are_rejected(tokenizer, tools, message):
    with pytest.raises(ValueError, match=message):
        tool_call_grammar(tools, markers=G.Markers.of(tokenizer))


def test_unknown_named_function_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="no tool"):
        tool_call_grammar(TOOLS, function="nope", markers=G.Markers.of(tokenizer))
