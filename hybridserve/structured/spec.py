"""StructuredSpec: the constraint of one request, as plain data.

Built and validated on the API side (`grammars.build_spec`), carried unchanged to the engine inside
`SamplingParams` (msgpack), compiled there. `grammar` is an llguidance grammar (its JSON form) and is
also the cache key: two requests with the same constraint share one compiled grammar.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredSpec:
    grammar: str  # llguidance grammar, JSON form: {"grammars": [...]}
    kind: str  # what was asked for: json, regex, choice, grammar, structural_tag, tool_call (logs, metrics)
