"""A request's structured-output fields -> its StructuredSpec (or None); a bad one is a 400 naming it.

One constraint per request, in any of these spellings (chat and completions):

* `response_format`: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"schema",
  "strict"}}` (`strict: true` rejects schema keywords that cannot be enforced; otherwise they are
  ignored), vLLM's `{"type": "structural_tag", "structures", "triggers"}`, or `{"type": "text"}`;
* vLLM's `structured_outputs`: exactly one of `json`, `json_object`, `regex`, `choice`, `grammar`,
  `structural_tag`, plus an optional `whitespace_pattern` for JSON;
* the legacy `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (and
  `guided_whitespace_pattern`).

Chat with `tool_choice` "required" or a named function gets the tool-call grammar instead (another
constraint with it is a 400). With thinking on, the grammar starts after `</think>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridserve.serve.errors import bad_request
from hybridserve.structured import grammars
from hybridserve.structured.spec import StructuredSpec
from hybridserve.structured.tool_grammar import tool_call_grammar

_BUILDERS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "json": ("json", grammars.json_schema),
    "regex": ("regex", grammars.regex),
    "choice": ("choice", grammars.choice),
    "grammar": ("grammar", grammars.grammar),
    "structural_tag": ("structural_tag", grammars.structural_tag),
}
# structured_outputs keys that tune vLLM's own backends; nothing to do here (JSON is always compact)
_IGNORED_KEYS = {"disable_fallback", "disable_any_whitespace", "disable_additional_properties", "backend",
                 "_backend", "_backend_was_auto"}
_Constraint = tuple[str, str, Callable[[], dict[str, Any]]]  # (request field, kind, answer grammar builder)


def structured_spec(req: Any, tokenizer: Any, *, reasoning_open: bool = False,
                    tools: list[dict[str, Any]] | None = None, tool_function: str | None = None,
                    parallel_tool_calls: bool = True) -> StructuredSpec | None:
    """The request's constraint. tools: the tools a call must be made from (`tool_choice` required
    or named), None otherwise; tool_function: the named function."""
    constraints = _constraints(req)
    if len(constraints) > 1:
        raise bad_request(f"only one structured-output constraint per request; got {constraints[0][0]} and "
                          f"{constraints[1][0]}", constraints[1][0])
    if tools is not None:
        if constraints:
            raise bad_request(f"{constraints[0][0]} cannot be combined with tool_choice \"required\" or a named "
                              "function (the output is the tool call)", constraints[0][0])
        param, kind = "tools", "tool_call"
    elif constraints:
        param, kind, build = constraints[0]
    else:
        return None
    markers = grammars.Markers.of(tokenizer)
    try:
        if tools is not None:
            answer = tool_call_grammar(tools, function=tool_function, parallel=parallel_tool_calls, markers=markers)
        else:
            answer = build()
        return grammars.build_spec(answer, kind, reasoning=reasoning_open, markers=markers)
    except ValueError as e:
        raise bad_request(f"invalid {param}: {e}", param) from None


def _constraints(req: Any) -> list[_Constraint]:
    found: list[_Constraint] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        found += _response_format(fmt)
    outputs = getattr(req, "structured_outputs", None)
    if outputs is not None:
        found += _structured_outputs(outputs)
    pattern = getattr(req, "guided_whitespace_pattern", None)
    for field, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(req, field, None)
        if value is not None:
            found.append(_from_key(field, key, value, pattern))
    return found


def _response_format(fmt: dict[str, Any]) -> list[_Constraint]:
    kind = fmt.get("type", "text")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json", lambda: grammars.json_schema({"type": "object"}))]
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request('response_format.json_schema must be an object {"name", "schema", "strict"}',
                              "response_format.json_schema")
        schema = spec.get("schema", {})
        lenient = spec.get("strict") is not True
        return [("response_format.json_schema.schema", "json", lambda: grammars.json_schema(schema, lenient=lenient))]
    if kind == "structural_tag":
        return [("response_format", "structural_tag", lambda: grammars.structural_tag(fmt))]
    raise bad_request(f"response_format type {kind!r} is not one of text, json_object, json_schema, structural_tag",
                      "response_format.type")


def _structured_outputs(outputs: dict[str, Any]) -> list[_Constraint]:
    unknown = sorted(set(outputs) - set(_BUILDERS) - _IGNORED_KEYS - {"json_object", "whitespace_pattern"})
    if unknown:
        raise bad_request(f"unknown structured_outputs field(s): {', '.join(unknown)}", f"structured_outputs.{unknown[0]}")
    found = []
    if outputs.get("json_object"):
        found.append(("structured_outputs.json_object", "json", lambda: grammars.json_schema({"type": "object"})))
    for key in _BUILDERS:
        if outputs.get(key) is not None:
            found.append(_from_key(f"structured_outputs.{key}", key, outputs[key], outputs.get("whitespace_pattern")))
    if not found:
        raise bad_request("structured_outputs needs one of json, json_object, regex, choice, grammar, structural_tag",
                          "structured_outputs")
    return found


def _from_key(field: str, key: str, value: Any, whitespace_pattern: str | None) -> _Constraint:
    kind, build = _BUILDERS[key]
    if key == "json":
        return field, kind, lambda: grammars.json_schema(value, whitespace_pattern=whitespace_pattern)
    return field, kind, lambda: build(value)
