"""Grammars built from request constraints, decoded by random walks (no model): every complete
output follows its constraint, JSON is compact and strictly valid, bad constraints are ValueErrors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from hybridserve.structured import grammars as G
from hybridserve.structured.compiler import GrammarCompiler
from hybridserve.tokenizer import build_synthetic_tokenizer
from tests.structured.conftest import SCHEMAS, text_of

WALKS = 12
JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_validate(name, walk, tokenizer):
    schema = SCHEMAS[name]
    spec = G.build_spec(G.json_schema(schema), "json")
    for seed in range(WALKS):
        tokens, complete = walk(spec, seed)
        assert complete, f"walk {seed} did not finish"
        text = text_of(tokenizer, tokens)
        value = json.loads(text)  # strict: raw control characters in strings would fail here
        jsonschema.validate(value, schema)
        assert not re.search(r"\s", JSON_STRING.sub("", text)), f"whitespace outside strings: {text!r}"


def test_unbounded_strings_have_no_raw_control_characters(walk, tokenizer):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 40}, "t": {"type": "string"}},
              "required": ["s", "t"]}
    spec = G.build_spec(G.json_schema(schema), "json")
    for seed in range(WALKS):
        tokens, complete = walk(spec, seed, max_tokens=3000)
        assert complete
        jsonschema.validate(json.loads(text_of(tokenizer, tokens)), schema)


def test_json_object_and_whitespace_pattern(walk, tokenizer):
    spec = G.build_spec(G.json_schema({"type": "object"}), "json")
    for seed in range(4):
        tokens, complete = walk(spec, seed, max_tokens=3000)
        if complete:  # free-form objects may be long; those that end are objects
            assert isinstance(json.loads(text_of(tokenizer, tokens)), dict)
    spaced = G.build_spec(G.json_schema(SCHEMAS["optional_fields"], whitespace_pattern=" "), "json")
    text = text_of(tokenizer, walk(spaced, 0)[0])
    jsonschema.validate(json.loads(text), SCHEMAS["optional_fields"])


def test_regex_choice_and_grammars(walk, tokenizer):
    spec = G.build_spec(G.regex(r"[A-Z][a-z]{2,5}-\d{3}"), "regex")
    for seed in range(WALKS):
        tokens, complete = walk(spec, seed)
        assert complete and re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", text_of(tokenizer, tokens))
    spec = G.build_spec(G.choice(["yes", "no", "maybe later"]), "choice")
    assert {text_of(tokenizer, walk(spec, s)[0]) for s in range(WALKS)} <= {"yes", "no", "maybe later"}
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'
    for text in (gbnf, lark):
        spec = G.build_spec(G.grammar(text), "grammar")
        for seed in range(WALKS):
            tokens, complete = walk(spec, seed)
            assert complete and re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text_of(tokenizer, tokens))


def test_structural_tag(walk, tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    tag = {"type": "structural_tag", "triggers": ["<fn="],
           "structures": [{"begin": "<fn=a>", "schema": schema, "end": "</fn>"}]}
    spec = G.build_spec(G.structural_tag(tag), "structural_tag")
    opening = tokenizer.encode("Sure. <fn=", add_special_tokens=False)
    for seed in range(WALKS):
        tokens, _ = walk(spec, seed, max_tokens=60, forced=dict(enumerate(opening)))
        text = text_of(tokenizer, tokens)
        # once the trigger is written, the structure follows: its begin, its schema's JSON, its end
        m = re.match(r"Sure\. <fn=a>(.*?)</fn>", text, re.S)
        assert m, text
        jsonschema.validate(json.loads(m.group(1)), schema)
    assert G.structural_tag(json.dumps(tag)) == G.structural_tag(tag)  # the JSON-string form


def test_reasoning_prefix_then_answer(walk, tokenizer):
    markers = G.Markers.of(tokenizer)
    assert set(markers.token_ids) == {G.THINK_END, G.TOOL_CALL_START, G.TOOL_CALL_END}
    schema = SCHEMAS["optional_fields"]
    spec = G.build_spec(G.json_schema(schema), "json", reasoning=True, markers=markers)
    think_end = markers.token_ids[G.THINK_END]
    for seed in range(WALKS):
        # the thinking budget forces </think> mid-reasoning: the grammar must take it there
        budget = lambda tokens: think_end if len(tokens) >= 20 and think_end not in tokens else None
        tokens, complete = walk(spec, seed, max_tokens=600, force=budget)
        assert complete and think_end in tokens
        cut = tokens.index(think_end)
        reasoning, answer = text_of(tokenizer, tokens[:cut]), text_of(tokenizer, tokens[cut + 1:])
        assert G.TOOL_CALL_START not in reasoning and markers.token_ids[G.TOOL_CALL_START] not in tokens[:cut]
        assert len(answer) - len(answer.lstrip("\n")) <= 2  # at most two newlines after </think>
        jsonschema.validate(json.loads(answer), schema)


def test_reasoning_prefix_with_a_text_tag(walk, tokenizer):
    """A tokenizer without a `</think>` token: the reasoning ends at the tag's text."""
    spec = G.build_spec(G.choice(["A", "B"]), "choice", reasoning=True, markers=G.NO_MARKERS)
    pieces = [t for part in ("hm </th", "ink>") for t in tokenizer.encode(part, add_special_tokens=False)]
    forced = dict(enumerate(pieces))
    tokens, complete = walk(spec, 0, forced=forced)
    assert complete and text_of(tokenizer, tokens)[len("hm </think>"):].strip() in ("A", "B")


def test_markers_write_single_token_tags_as_tokens(tokenizer):
    m = G.Markers.of(tokenizer)
    assert m.lit("<tool_call>\n<function=f>") == f'<[{m.token_ids["<tool_call>"]}]> "\\n<function=f>"'
    assert m.lit("plain") == '"plain"' and G.NO_MARKERS.lit("<tool_call>") == '"<tool_call>"'


@pytest.mark.parametrize("build,value,message", [
    (G.json_schema, {"type": "nonsense"}, "Invalid type"),
    (G.json_schema, "{not json", "not valid JSON"),
    (G.json_schema, [1, 2], "must be a JSON object"),
    (G.json_schema, {"type": "array", "uniqueItems": True}, "uniqueItems"),
    (G.regex, "(unclosed", "unclosed group"),
    (G.regex, "a(?=b)", "look-around"),
    (G.regex, 5, "must be a string"),
    (G.choice, [], "non-empty list"),
    (G.choice, ["a", 1], "non-empty list"),
    (G.grammar, "start: undefined_rule", "unknown name"),
    (G.grammar, "", "non-empty"),
    (G.structural_tag, {"structures": [], "triggers": ["<f"]}, "structures"),
    (G.structural_tag, {"structures": [{"begin": "<g>", "schema": {}, "end": ""}], "triggers": ["<f"]},
     "does not start with any trigger"),
])
def test_invalid_constraints_raise_value_error(build, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        G.build_spec(build(value), "x")


def test_lenient_schema_ignores_what_it_cannot_enforce(walk, tokenizer):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "maxItems": 3,
              "uniqueItems": True}
    spec = G.build_spec(G.json_schema(schema, lenient=True), "json")
    tokens, complete = walk(spec, 0)
    assert complete and all(0 <= v <= 3 for v in json.loads(text_of(tokenizer, tokens)))


def test_a_tokenizer_llguidance_cannot_read_fails_the_request_clearly():
    """llguidance reads byte-level and metaspace tokenizers; the full-size preset's synthetic
    word-level one (no decoder) cannot spell JSON anyway, so its structured requests fail."""
    compiler = GrammarCompiler(build_synthetic_tokenizer(600), 600, [11])
    with pytest.raises(ValueError, match="this tokenizer cannot be used for structured outputs"):
        compiler.submit(G.build_spec(G.regex("w1[0-9]{2}"), "regex")).result()
    compiler.shutdown()
