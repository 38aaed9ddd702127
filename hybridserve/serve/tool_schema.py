"""Convert a tool-call parameter's raw text to a JSON value, guided by the tool's JSON schema.

The model writes every parameter as plain text (`<parameter=n>\\n5\\n</parameter>`); the schema says
whether that text is a string (kept verbatim, never JSON-parsed), a number, a boolean or a JSON
object/array. Rules follow the `qwen3_coder` conversion table (model-spec.md §4.5), with the newer
refinements: a string keeps a literal "null" unless the schema allows null; `anyOf` / `oneOf` /
`allOf` (nested too) / a list of types picks the first non-null type, after local `$ref`s are
inlined; a `number` written as an integer stays an exact integer. A value that does not fit its type stays a string, so a
conversion never fails and never produces invalid JSON (no NaN / Infinity).
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}
INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
BOOL_TYPES = {"boolean", "bool", "binary"}
CONTAINER_TYPES = {"object", "array", "arr"}
MAX_LITERAL_LEN = 20_000  # Python-literal fallback is skipped for huge values (cost bound)


MAX_SCHEMA_DEPTH = 16  # $ref / anyOf nesting followed (a bound for cyclic or hostile schemas)


def inline_refs(schema: Any, root: Any, depth: int = 0) -> Any:
    """`schema` with local `$ref`s ("#/$defs/X", "#/definitions/X", any JSON pointer into `root`)
    replaced by their targets, at the top and inside `anyOf` / `oneOf` / `allOf` (what decides a
    value's type); a reference that does not resolve, or a cycle, is left as it is."""
    if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
        return schema
    out = dict(schema)
    ref = out.pop("$ref", None)
    target = _pointer(root, ref) if isinstance(ref, str) else None
    if isinstance(target, dict):
        out = {**inline_refs(target, root, depth + 1), **out}
    elif ref is not None:
        out["$ref"] = ref
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [inline_refs(option, root, depth + 1) for option in out[key]]
    return out


def _pointer(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return None  # remote references are never fetched
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _types(schema: Any, depth: int = 0) -> tuple[list[str], bool]:
    """Candidate type names in schema order (through nested anyOf / oneOf / allOf), and nullable."""
    if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
        return [], False
    nullable = bool(schema.get("nullable"))
    t = schema.get("type")
    names = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        for option in options if isinstance(options, list) else []:
            sub, sub_nullable = _types(option, depth + 1)
            names += sub
            nullable = nullable or sub_nullable
    nullable = nullable or "null" in names
    return [n for n in names if n != "null"], nullable


def parameter_type(schema: Any) -> tuple[str, bool]:
    """(lower-case type name, nullable) of one property schema (its `$ref`s inlined); the first
    non-null type of a union wins; no type means string."""
    names, nullable = _types(schema)
    return (str(names[0]).strip().lower() if names else "string"), nullable


def is_streamable_string(schema: Any) -> bool:
    """Values of this schema can be streamed character by character as a JSON string."""
    t, nullable = parameter_type(schema)
    return t in STRING_TYPES and not nullable


def convert_parameter(value: str, schema: Any) -> Any:
    """The JSON value for the raw text `value` of a parameter whose schema is `schema` (None: unknown)."""
    if schema is None:
        return value
    t, nullable = parameter_type(schema)
    if value.strip().lower() in ("null", "none") and (nullable or t not in STRING_TYPES):
        return None
    if t in STRING_TYPES:
        return value
    text = value.strip()
    if t.startswith(INT_PREFIXES):
        try:
            return int(text)
        except ValueError:
            return _as_number(text, value)
    if t.startswith(("num", "float", "double")):
        if _INTEGER.fullmatch(text):
            return int(text)  # exact: float() would round 9007199254740993
        return _as_number(text, value)
    if t in BOOL_TYPES:
        return text.lower() == "true"
    if t in CONTAINER_TYPES or t.startswith(("dict", "list")):
        parsed = _parse_json(text)
        if parsed is not _FAILED:
            return parsed
    return _parse_literal(text, value)


_FAILED = object()
_INTEGER = re.compile(r"[-+]?\d+")


def _as_number(text: str, fallback: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return fallback
    if not math.isfinite(number):
        return fallback
    return int(number) if number.is_integer() and abs(number) < 2**63 else number


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _FAILED


def _parse_literal(text: str, fallback: str) -> Any:
    if len(text) > MAX_LITERAL_LEN:
        return fallback
    try:
        value = ast.literal_eval(text)
        json.dumps(value, allow_nan=False)
    except Exception:  # any failure (syntax, recursion, sets, bytes...) keeps the text
        return fallback
    return value if isinstance(value, (dict, list)) else fallback
