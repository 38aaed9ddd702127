"""Convert a tool-call parameter's raw text to a JSON value, guided by the tool's JSON schema.

The model writes every parameter as plain text (`<parameter=n>\\n5\\n</parameter>`); the schema says
whether that text is a string (kept verbatim, never JSON-parsed), a number, a boolean or a JSON
object/array. Rules follow the `qwen3_coder` conversion table (model-spec.md §4.5), with the newer
refinements: a string keeps a literal "null" unless the schema allows null, and `anyOf` / a list
of types picks the first non-null type. A value that does not fit its type stays a string, so a
conversion never fails and never produces invalid JSON (no NaN / Infinity).
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}
INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
BOOL_TYPES = {"boolean", "bool", "binary"}
CONTAINER_TYPES = {"object", "array", "arr"}
MAX_LITERAL_LEN = 20_000  # Python-literal fallback is skipped for huge values (cost bound)


def parameter_type(schema: Any) -> tuple[str, bool]:
    """(lower-case type name, nullable) of one property schema; missing type means string."""
    if not isinstance(schema, dict):
        return "string", False
    nullable = bool(schema.get("nullable"))
    t = schema.get("type")
    if t is None:
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                types = [o.get("type") for o in options if isinstance(o, dict)]
                nullable = nullable or "null" in types
                t = next((x for x in types if x and x != "null"), None)
                break
        if t is None:
            return "string", nullable
    if isinstance(t, list):
        nullable = nullable or "null" in t
        t = next((x for x in t if x != "null"), "string")
    return str(t).strip().lower(), nullable


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
        return _as_number(text, value)
    if t in BOOL_TYPES:
        return text.lower() == "true"
    if t in CONTAINER_TYPES or t.startswith(("dict", "list")):
        parsed = _parse_json(text)
        if parsed is not _FAILED:
            return parsed
    return _parse_literal(text, value)


_FAILED = object()


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
