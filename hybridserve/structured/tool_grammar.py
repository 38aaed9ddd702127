"""The grammar of guaranteed tool calls in the qwen3_coder format (Nemotron's), over a request's tools.

    <tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n ... </function>\\n</tool_call>\\n

One call (or, with parallel calls, one or more), nothing else: function names come from the tools
(one name for a named `tool_choice`), parameters in schema order, required ones always present,
no others. A value is written so that `serve/tool_calls.py` parses it back to a value of its
schema, by the same type rules (`tool_schema.parameter_type`):

* string: raw text (the parser keeps it verbatim) without the markup that would end it and without
  control characters but tab and newline; an enum or const is exactly one of its strings (no stray
  whitespace: the parser would keep it); pattern, minLength and maxLength are enforced;
* integer / number: JSON numbers with the schema's bounds; boolean: `true` / `false`;
* object / array: compact JSON of the parameter's schema;
* nullable: also `null`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import llguidance

from hybridserve.serve.tool_calls import VALID_NAME
from hybridserve.serve.tool_schema import (
    BOOL_TYPES,
    CONTAINER_TYPES,
    INT_PREFIXES,
    STRING_TYPES,
    parameter_type,
)
from hybridserve.structured.grammars import COMPACT_JSON, TOOL_CALL_END, TOOL_CALL_START, Markers, lark_string

VALUE_END = "\n</parameter>\n"
# the parser ends a value at any of these; a string value must not contain them
VALUE_STOPS = r"/(?s:.*)(<\/parameter>|<parameter=|<\/function>|<\/tool_call>)(?s:.*)/"
STRING_CHARS = r"/[^\x00-\x08\x0b-\x1f\x7f]*/"
NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const")
CALL_OPEN, CALL_CLOSE = TOOL_CALL_START + "\n", TOOL_CALL_END + "\n"
FREE_PARAMETER_NAME = r"/[A-Za-z0-9_.\-]+/"


def tool_call_grammar(tools: Iterable[dict[str, Any]], *, function: str | None = None, parallel: bool = True,
                      markers: Markers) -> dict[str, Any]:
    """An answer grammar (see `grammars.build_spec`): the calls `tool_choice` asks for.
    function: the one function a named tool_choice allows (None: any of the tools)."""
    fns = [t.get("function", t) for t in tools]
    if function is not None:
        fns = [f for f in fns if f.get("name") == function]
    if not fns:
        raise ValueError("no tool to call")
    rules = _Rules(markers)
    names = []
    for i, fn in enumerate(fns):
        name = fn.get("name")
        if not isinstance(name, str) or not VALID_NAME.fullmatch(name):
            raise ValueError(f"function name {name!r} cannot be written in a tool call (no spaces, quotes, "
                             "<>{}=/)")
        names.append(rules.function(f"f{i}", name, fn.get("parameters") or {}))
    head = f"call: {markers.lit(CALL_OPEN)} ({' | '.join(names)}) {markers.lit(CALL_CLOSE)}"
    return {"lark_grammar": "\n".join(["start: call+" if parallel else "start: call", head, *rules.lines])}


class _Rules:
    """Lark rules of the functions, their parameters and values."""

    def __init__(self, markers: Markers):
        self.markers = markers
        self.lines = [f"STRING_TEXT: {STRING_CHARS} & ~{VALUE_STOPS}",
                      f"STRING_VALUE: STRING_TEXT {lark_string(VALUE_END)}"]

    def function(self, rule: str, name: str, parameters: dict[str, Any]) -> str:
        props = parameters.get("properties") if isinstance(parameters, dict) else None
        props = props if isinstance(props, dict) else {}
        required = set(parameters.get("required") or []) if isinstance(parameters, dict) else set()
        items = [lark_string(f"<function={name}>\n")]
        for j, (pname, schema) in enumerate(props.items()):
            if not isinstance(pname, str) or not pname or any(c in pname for c in "<>\n"):
                raise ValueError(f"parameter name {pname!r} of {name!r} cannot be written in a tool call")
            prule = f"{rule}_p{j}"
            opening = lark_string(f"<parameter={pname}>\n")
            self.lines.append(f"{prule}: {opening} {self.value(prule, schema)}")
            items.append(prule if pname in required else prule + "?")
        if not props and parameters.get("additionalProperties", True) is not False:
            # a free-form object: any parameters, every value a string
            self.lines.append(f'{rule}_any: "<parameter=" {FREE_PARAMETER_NAME} ">\\n" STRING_VALUE')
            items.append(f"{rule}_any*")
        items.append(lark_string("</function>\n"))
        self.lines.append(f"{rule}: " + " ".join(items))
        return rule

    def value(self, rule: str, schema: Any) -> str:
        """Lark items for one parameter's value and the end of the parameter."""
        t, nullable = parameter_type(schema)
        schema = _option_of_type(schema, t)
        kind = _value_kind(t)
        if kind == "string":
            return self._string(rule, schema)
        if kind == "null":
            return f'"null" {lark_string(VALUE_END)}'
        if kind == "boolean":
            body = '("true" | "false")'
        else:
            if kind == "json":
                sub = {k: v for k, v in schema.items() if k not in ("nullable", "x-guidance")}
            else:  # integer, number
                sub = {"type": kind, **{k: schema[k] for k in NUMBER_KEYS if k in schema}}
            body = "%json " + json.dumps({**sub, "x-guidance": COMPACT_JSON}, ensure_ascii=False)
        if nullable:
            body = f'({body} | "null")'
        return f"{body} {lark_string(VALUE_END)}"

    def _string(self, rule: str, schema: dict[str, Any]) -> str:
        """A raw-text value: the whole STRING_VALUE, or a terminal of its own for a constrained one."""
        options = [schema["const"]] if "const" in schema else schema.get("enum")
        if isinstance(options, list) and options:
            words = [o if isinstance(o, str) else json.dumps(o) for o in options]
            self.lines.append(f"{rule.upper()}_VALUE: ({' | '.join(lark_string(w) for w in words)}) "
                              f"{lark_string(VALUE_END)}")
            return f"{rule.upper()}_VALUE"
        parts = []
        if isinstance(schema.get("pattern"), str):
            parts.append("/" + _full_match(schema["pattern"]) + "/")
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(low, int) or isinstance(high, int):
            parts.append(f"/(?s:.){{{low or 0},{high if isinstance(high, int) else ''}}}/")
        if not parts:
            return "STRING_VALUE"
        self.lines.append(f"{rule.upper()}_VALUE: (STRING_TEXT & {' & '.join(parts)}) {lark_string(VALUE_END)}")
        return f"{rule.upper()}_VALUE"


def _option_of_type(schema: Any, t: str) -> dict[str, Any]:
    """The part of a property schema that describes type `t` (its anyOf / oneOf option, if any)."""
    if not isinstance(schema, dict):
        return {}
    if "type" not in schema:
        for key in ("anyOf", "oneOf"):
            for option in schema.get(key) or []:
                if isinstance(option, dict) and str(option.get("type", "")).strip().lower() == t:
                    return option
        return schema
    if isinstance(schema["type"], list):
        return {**schema, "type": t}
    return schema


def _value_kind(t: str) -> str:
    """How the parser converts a value of type `t` (the order of `tool_schema.convert_parameter`)."""
    if t in STRING_TYPES:
        return "string"
    if t.startswith(INT_PREFIXES):
        return "integer"
    if t.startswith(("num", "float", "double")):
        return "number"
    if t in BOOL_TYPES:
        return "boolean"
    if t in CONTAINER_TYPES or t.startswith(("dict", "list")):
        return "json"
    return "null" if t == "null" else "string"  # any other type stays text


def _full_match(pattern: str) -> str:
    """A JSON-schema pattern (found anywhere unless anchored) as a regex for the whole value."""
    starts = pattern.startswith("^")
    ends = pattern.endswith("$") and not pattern.endswith("\\$")
    core = pattern[1 if starts else 0: len(pattern) - 1 if ends else None]
    whole = ("" if starts else "(?s:.*)") + "(" + core + ")" + ("" if ends else "(?s:.*)")
    return llguidance.regex_to_lark(whole, "dw")
