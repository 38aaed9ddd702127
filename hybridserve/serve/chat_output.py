"""One chat choice's output text -> reasoning, content and tool calls, delta by delta.

Chains the reasoning parser (whose content goes on) into the tool-call parser, and applies the
request's tool policy: a named `tool_choice` keeps only calls to that function, and
`parallel_tool_calls=false` keeps only the first call; kept calls are renumbered from 0. Streaming
sends each `feed` result as one chunk (the last with `final=True`); non-streaming folds the same deltas with `ChoiceAccumulator`,
so both paths produce the same message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridserve.serve.reasoning import ReasoningParser
from hybridserve.serve.tool_calls import ContentText, ToolCallArguments, ToolCallParser, ToolCallStart


@dataclass
class ChoiceDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI delta entries, one per call index

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatOutputParser:
    def __init__(self, reasoning_open: bool, tools: list[dict[str, Any]] | None = None,
                 only_function: str | None = None, parallel_tool_calls: bool = True, hindsight: bool = False):
        self._reasoning = ReasoningParser(reasoning_open, tool_call_ends_reasoning=tools is not None,
                                          hindsight=hindsight)
        self._tools = ToolCallParser(tools) if tools is not None else None
        self._only_function = only_function
        self._parallel = parallel_tool_calls
        self._kept: dict[int, int] = {}  # parser call index -> output index

    @property
    def in_reasoning(self) -> bool:
        return self._reasoning.in_reasoning

    @property
    def undecided(self) -> bool:
        """Text is held whose side (reasoning or content) is not known yet."""
        return self._reasoning.undecided

    @property
    def held_was_reasoning(self) -> bool:
        return self._reasoning.held_was_reasoning

    @property
    def num_tool_calls(self) -> int:
        return len(self._kept)

    def feed(self, text: str, final: bool = False) -> ChoiceDelta:
        """The delta for new output text; `final` also flushes everything held back."""
        r = self._reasoning.feed(text)
        reasoning, content = r.reasoning, r.content
        if final:
            rest = self._reasoning.finish()
            reasoning, content = reasoning + rest.reasoning, content + rest.content
        return self._route(reasoning, content, final)

    def _route(self, reasoning: str, content: str, final: bool) -> ChoiceDelta:
        out = ChoiceDelta(reasoning=reasoning)
        if self._tools is None:
            out.content = content
            return out
        events = self._tools.feed(content) if content else []
        if final:
            events += self._tools.finish()
        # A call's first entry carries its id and name with empty arguments; its argument text goes in
        # a second entry, also when both come in one step (a held call released at once).
        starts: list[dict[str, Any]] = []
        arguments: dict[int, dict[str, Any]] = {}
        for ev in events:
            if isinstance(ev, ContentText):
                out.content += ev.text
            elif isinstance(ev, ToolCallStart):
                if self._keep(ev):  # a dropped call's arguments are skipped below: not in _kept
                    k = self._kept[ev.index] = len(self._kept)
                    starts.append({"index": k, "id": ev.id, "type": "function",
                                   "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, ToolCallArguments) and ev.index in self._kept:
                k = self._kept[ev.index]
                arguments.setdefault(k, {"index": k, "function": {"arguments": ""}})["function"]["arguments"] += ev.fragment
        out.tool_calls = sorted(starts + list(arguments.values()), key=lambda e: (e["index"], "id" not in e))
        return out

    def _keep(self, start: ToolCallStart) -> bool:
        if self._only_function is not None and start.name != self._only_function:
            return False
        return self._parallel or not self._kept


class ChoiceAccumulator:
    """Folds deltas into the final message fields (non-streaming responses). Text is kept as parts
    and joined once: `+=` on an attribute copies the whole string every step."""

    def __init__(self) -> None:
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._arguments: list[list[str]] = []  # per tool call
        self._calls: list[dict[str, Any]] = []

    def add(self, delta: ChoiceDelta) -> None:
        self._reasoning.append(delta.reasoning)
        self._content.append(delta.content)
        for entry in delta.tool_calls:
            if "id" in entry:
                self._calls.append({"id": entry["id"], "type": "function", "function": {"name": entry["function"]["name"]}})
                self._arguments.append([])
            self._arguments[entry["index"]].append(entry["function"]["arguments"])

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [{**call, "function": {**call["function"], "arguments": "".join(args)}}
                for call, args in zip(self._calls, self._arguments)]
