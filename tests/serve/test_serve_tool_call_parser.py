"""Tool-call parsing: hand-written outputs, schema conversion, and streaming == non-streaming at any split."""

import itertools
import json
import random
from dataclasses import dataclass, field

import pytest

from hybridserve.serve.tool_calls import (
    ContentText,
    ToolCallArguments,
    ToolCallParser,
    ToolCallStart,
    tool_parameter_schemas,
)
from hybridserve.serve.tool_schema import convert_parameter, parameter_type


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ParsedContent:
    content: str | None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def collect(events) -> ParsedContent:
    """Fold parser events into content text and complete calls."""
    result = ParsedContent(content=None)
    for ev in events:
        if isinstance(ev, ContentText):
            result.content = (result.content or "") + ev.text
        elif isinstance(ev, ToolCallStart):
            result.tool_calls.append(ParsedToolCall(ev.id, ev.name, ""))
        else:
            result.tool_calls[ev.index].arguments += ev.fragment
    return result


def parse_tool_calls(text: str, tools) -> ParsedContent:
    """The whole text at once through the same state machine."""
    parser = ToolCallParser(tools)
    return collect(parser.feed(text) + parser.finish())

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "scale": {"type": "number"},
        "metric": {"type": "boolean"},
        "opts": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": ["string", "null"]},
    }}}},
    {"type": "function", "function": {"name": "search", "parameters": None}},
]

CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"

CASES = [
    # (text, expected content, [(name, arguments dict)])
    ("Just text.", "Just text.", []),
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n\n" + CALL, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (CALL + "\n" + CALL.replace("Paris", "Lyon"), None,
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})]),
    # every schema type
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
     "<parameter=scale>\n2.5\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=opts>\n"
     '{"a": {"b": [1, null]}}\n</parameter>\n<parameter=tags>\n["x", "y"]\n</parameter>\n'
     "<parameter=note>\nnull\n</parameter>\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "42", "days": 3, "scale": 2.5, "metric": True, "opts": {"a": {"b": [1, None]}},
                       "tags": ["x", "y"], "note": None})]),
    # missing final </parameter>, and missing </function></tool_call> at the end of output
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "Paris"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n", None,
     [("get_weather", {"city": "Paris", "days": 2})]),
    # multi-line string values keep inner newlines and quotes; only one leading/trailing \n is stripped
    ('<tool_call>\n<function=search>\n<parameter=q>\n\nline "1"\nline 2\n\n</parameter>\n</function>\n</tool_call>',
     None, [("search", {"q": '\nline "1"\nline 2\n'})]),
    # unknown tool: values stay strings; no parameters gives {}
    ("<tool_call>\n<function=nope>\n<parameter=n>\n5\n</parameter>\n</function>\n</tool_call>", None,
     [("nope", {"n": "5"})]),
    ("<tool_call>\n<function=search>\n</function>\n</tool_call>", None, [("search", {})]),
    # bare <function= without the <tool_call> wrapper still parses
    ("<function=search>\n<parameter=q>\nhi\n</parameter>\n</function>", None, [("search", {"q": "hi"})]),
    # a truncated header never leaks into content
    ("Sure.<tool_call>\n<function=get_wea", "Sure.", []),
    ("<tool_call>\n<function=bad name>\n<parameter=q>\nx\n</parameter>\n</function>\n</tool_call>", None, []),
    # unicode and characters that need JSON escaping
    ("<tool_call>\n<function=search>\n<parameter=q>\nçà \\ \t 日本\n</parameter>\n</function>\n</tool_call>", None,
     [("search", {"q": "çà \\ \t 日本"})]),
    # non-numeric text for a number keeps the string; NaN is never emitted
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=scale>\nnan\n"
     "</parameter>\n</function>\n</tool_call>", None, [("get_weather", {"days": "three", "scale": "nan"})]),
    # text after the calls is not content
    (CALL + "\ntrailing words", None, [("get_weather", {"city": "Paris"})]),
    ("a < b <tool", "a < b <tool", []),
]


def _check(result, content, calls):
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == calls
    for c in result.tool_calls:  # fragments concatenate to exactly the canonical JSON
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False)


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text, content, calls):
    _check(parse_tool_calls(text, TOOLS), content, calls)


def _stream(pieces):
    ids = (f"call_{i}" for i in itertools.count())
    parser = ToolCallParser(TOOLS, id_factory=lambda: next(ids))
    events = []
    for p in pieces:
        events += parser.feed(p)
    return collect(events + parser.finish())


def _splits(text, seed=0):
    yield list(text)
    for i in range(0, len(text) + 1, max(1, len(text) // 40)):
        for j in range(i, len(text) + 1, max(1, len(text) // 25)):
            yield [text[:i], text[i:j], text[j:]]
    rng = random.Random(seed)
    for _ in range(40):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_streaming_equals_non_streaming(text, content, calls):
    whole = _stream([text])
    _check(whole, content, calls)
    for pieces in _splits(text):
        got = _stream(pieces)
        assert got == whole, pieces


def test_every_single_split_point_of_a_call():
    text = "Hi.\n" + CALL
    whole = _stream([text])
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]]) == whole


def test_stream_order_name_first_then_incremental_arguments():
    parser = ToolCallParser(TOOLS, id_factory=lambda: "call_x")
    events = []
    for ch in CALL.replace("Paris", "Paris, France"):
        events.append(parser.feed(ch))
    events.append(parser.finish())
    flat = [e for batch in events for e in batch]
    assert isinstance(flat[0], ToolCallStart) and flat[0].name == "get_weather" and flat[0].id == "call_x"
    frags = [e.fragment for e in flat if isinstance(e, ToolCallArguments)]
    assert len(frags) > 5  # the string value streams character by character
    assert "".join(frags) == '{"city": "Paris, France"}'
    assert not any(isinstance(e, ContentText) for e in flat)
    # nothing is emitted for the name until the closing ">" of <function=...>
    first_start = next(i for i, b in enumerate(events) if any(isinstance(e, ToolCallStart) for e in b))
    assert CALL[: first_start + 1].endswith("<function=get_weather>")


def test_content_streams_before_the_call():
    parser = ToolCallParser(TOOLS)
    assert parser.feed("Hello") == [ContentText("Hello")]
    assert parser.feed(" there\n") == [ContentText(" there")]  # trailing whitespace held back
    assert parser.feed("<tool_") == []
    assert parser.feed("call>") == []
    assert parser.num_calls == 0


def test_parameter_type_resolution():
    assert parameter_type({"type": "INTEGER "}) == ("integer", False)
    assert parameter_type({"anyOf": [{"type": "null"}, {"type": "number"}]}) == ("number", True)
    assert parameter_type({"type": ["null", "boolean"]}) == ("boolean", True)
    assert parameter_type({}) == ("string", False)
    assert parameter_type(None) == ("string", False)
    nested = {"oneOf": [{"anyOf": [{"type": "null"}, {"type": "integer"}]}, {"type": "string"}]}
    assert parameter_type(nested) == ("integer", True)


def test_refs_are_inlined_before_conversion():
    """A tool whose parameters use `$defs` + `$ref` (pydantic / MCP style), nested in anyOf."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "$defs": {"Count": {"type": "integer"}, "Opt": {"anyOf": [{"$ref": "#/$defs/Count"}, {"type": "null"}]},
                  "Loop": {"$ref": "#/$defs/Loop"}},
        "properties": {"n": {"$ref": "#/$defs/Opt"}, "m": {"$ref": "#/$defs/Loop"}, "r": {"$ref": "http://x/y"}},
    }}}]
    schemas = tool_parameter_schemas(tools)["f"]
    assert convert_parameter("12", schemas["n"]) == 12 and convert_parameter("null", schemas["n"]) is None
    assert convert_parameter("12", schemas["m"]) == "12"  # a cycle resolves to nothing: a string
    assert convert_parameter("12", schemas["r"]) == "12"  # remote refs are never fetched
    parser = ToolCallParser(tools)
    events = parser.feed("<tool_call>\n<function=f>\n<parameter=n>\n7\n</parameter>\n</function>") + parser.finish()
    args = "".join(e.fragment for e in events if isinstance(e, ToolCallArguments))
    assert json.loads(args) == {"n": 7}


@pytest.mark.parametrize("value,schema,expected", [
    ("null", {"type": "string"}, "null"),
    ("null", {"type": ["string", "null"]}, None),
    ("null", {"type": "integer"}, None),
    ("5.0", {"type": "number"}, 5),
    ("5.5", {"type": "float"}, 5.5),
    ("7", {"type": "int64"}, 7),
    ("yes", {"type": "boolean"}, False),
    ("TRUE", {"type": "bool"}, True),
    ("{'a': 1}", {"type": "object"}, {"a": 1}),  # Python-literal fallback
    ("[1, 2", {"type": "array"}, "[1, 2"),
    ("hello", None, "hello"),
    ("01", {"type": "string"}, "01"),
    ("Infinity", {"type": "number"}, "Infinity"),
    ("9007199254740993", {"type": "number"}, 9007199254740993),  # beyond float precision: exact
    ("-12345678901234567890123", {"type": "number"}, -12345678901234567890123),
    ("1e3", {"type": "number"}, 1000),
])
def test_convert_parameter(value, schema, expected):
    assert convert_parameter(value, schema) == expected
