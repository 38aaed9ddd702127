"""A request's constraint -> one llguidance grammar, validated (API side, before anything is queued).

Every constraint is first an *answer* grammar: one entry of llguidance's grammar list (a JSON schema
or a Lark grammar). `build_spec` then puts a reasoning prefix in front when thinking is on — free
text up to `</think>` that never contains `<tool_call>` (the reasoning parser would end reasoning
there), then at most two newlines — checks the whole grammar and returns the `StructuredSpec` the
engine compiles. With thinking off the answer starts at the first token.

JSON is compact (no optional whitespace): with flexible whitespace a weak model under greedy
decoding fills `max_tokens` with spaces. Builders raise ValueError with a message the server puts
in a 400 naming the request field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from hybridserve.structured.spec import StructuredSpec

THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
COMPACT_JSON = {"whitespace_flexible": False}
MAX_ERROR_CHARS = 400
# reasoning text: anything (valid UTF-8) without the text `<tool_call>`
REASONING_TEXT = r"/(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/"


@dataclass(frozen=True)
class Markers:
    """The chat format's tags as Lark items: `<[id]>` where the tokenizer has the tag as one token
    (the model writes it so, and llguidance treats added tokens as special), else quoted text."""

    token_ids: dict[str, int]  # tag text -> its single token id

    @classmethod
    def of(cls, tokenizer: Any) -> Markers:
        ids = {}
        for tag in (THINK_END, TOOL_CALL_START, TOOL_CALL_END):
            tid = tokenizer.convert_tokens_to_ids(tag)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.encode(
                    tag, add_special_tokens=False) == [tid]:
                ids[tag] = tid
        return cls(ids)

    def lit(self, text: str) -> str:
        """Lark items that match exactly `text`, tags written as the tokens they are."""
        items, rest = [], text
        while rest:
            pos, tag = min(((rest.find(t), t) for t in self.token_ids if t in rest), default=(-1, None))
            if tag is None:
                items.append(lark_string(rest))
                break
            if pos:
                items.append(lark_string(rest[:pos]))
            items.append(f"<[{self.token_ids[tag]}]>")
            rest = rest[pos + len(tag):]
        return " ".join(items) or '""'


NO_MARKERS = Markers({})


def lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# ---- answer grammars ------------------------------------------------------------------------------
def json_schema(schema: Any, *, lenient: bool = False, whitespace_pattern: str | None = None) -> dict[str, Any]:
    """A JSON value that validates against `schema`. lenient: keywords llguidance cannot enforce are
    ignored instead of rejected."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"the schema is not valid JSON ({e})") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    options: dict[str, Any] = dict(COMPACT_JSON)
    if whitespace_pattern is not None:
        options = {"whitespace_pattern": whitespace_pattern}
    if lenient:
        options["lenient"] = True
    return {"json_schema": {**schema, "x-guidance": {**schema.get("x-guidance", {}), **options}}}


def regex(pattern: Any) -> dict[str, Any]:
    """Text that matches `pattern` entirely (Rust regex syntax: no look-around, no backreferences;
    `\\d` is an ASCII digit)."""
    if not isinstance(pattern, str):
        raise ValueError("the regex must be a string")
    return {"lark_grammar": "start: /" + llguidance.regex_to_lark(pattern, "d") + "/"}


def choice(options: Any) -> dict[str, Any]:
    """Exactly one of the given strings."""
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    return {"lark_grammar": "start: " + " | ".join(lark_string(o) for o in dict.fromkeys(options))}


def grammar(text: Any) -> dict[str, Any]:
    """A context-free grammar in Lark (llguidance's dialect) or GBNF / EBNF (`root ::= ...`) syntax."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the grammar must be a non-empty string")
    try:
        return {"lark_grammar": any_to_lark(text)}
    except Exception as e:  # the converter raises plain exceptions on syntax it cannot read
        raise ValueError(f"the grammar could not be read ({e})") from None


def structural_tag(tag: Any) -> dict[str, Any]:
    """Free text in which each trigger opens one of the structures: its `begin`, JSON for its
    `schema`, its `end` (vLLM's `{"structures": [...], "triggers": [...]}` form)."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except ValueError as e:
            raise ValueError(f"the structural tag is not valid JSON ({e})") from None
    structures = tag.get("structures") if isinstance(tag, dict) else None
    triggers = tag.get("triggers") if isinstance(tag, dict) else None
    if not isinstance(structures, list) or not structures:
        raise ValueError('a structural tag needs a non-empty "structures" list of {"begin", "schema", "end"}')
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError('a structural tag needs a non-empty "triggers" list of strings')
    lines = ["start: (" + " | ".join(f"tag_{i}" for i in range(len(structures))) + ")* TEXT", "TEXT: /(?s:.*)/"]
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end", ""), str):
            raise ValueError(f'structures[{i}] must be {{"begin": str, "schema": object, "end": str}}')
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structures[{i}].begin does not start with any trigger")
        body = json.dumps(json_schema(s.get("schema", {}))["json_schema"], ensure_ascii=False)
        lines.append(f"tag_{i}_head[lazy]: TEXT {lark_string(trigger)}")
        rest = s["begin"][len(trigger):]
        lines.append(f"tag_{i}: tag_{i}_head {lark_string(rest) if rest else ''} %json {body} "
                     f"{lark_string(s['end']) if s.get('end') else ''}")
    return {"lark_grammar": "\n".join(lines)}


# ---- the whole output ----------------------------------------------------------------------------
def build_spec(answer: dict[str, Any], kind: str, *, reasoning: bool = False,
               markers: Markers = NO_MARKERS) -> StructuredSpec:
    """The grammar of the whole output (reasoning prefix + answer), validated."""
    grammars = [answer]
    if reasoning:
        grammars = [{"lark_grammar": reasoning_prefix(markers)}, {"name": "answer", **answer}]
    text = json.dumps({"grammars": grammars}, ensure_ascii=False)
    check(text)
    return StructuredSpec(text, kind)


def reasoning_prefix(markers: Markers) -> str:
    """Reasoning until `</think>`, then the answer; the answer grammar is `@answer`."""
    lines = ["start: reasoning_end (\"\\n\" | \"\\n\\n\")? @answer", f"REASONING: {REASONING_TEXT}"]
    if THINK_END in markers.token_ids:
        lines.append(f"reasoning_end: REASONING {markers.lit(THINK_END)}")
    else:  # a text tag: the reasoning ends at its first occurrence
        lines += [f"REASONING_END: REASONING {lark_string(THINK_END)}", "reasoning_end[lazy]: REASONING_END"]
    return "\n".join(lines)


def check(grammar_text: str) -> None:
    """Raise ValueError with llguidance's message if the grammar is invalid."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_text)
    if is_error:
        raise ValueError(clean_error(messages[0] if messages else "invalid grammar"))


def clean_error(message: str) -> str:
    """llguidance's error line and its `error:` detail, without the grammar dump around them."""
    lines = message.strip().split("\n")
    text = " ".join([lines[0], *(ln.strip() for ln in lines[1:] if ln.strip().startswith("error:"))])
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."
