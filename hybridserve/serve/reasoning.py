"""Split Nemotron output into reasoning and content, fed as text deltas.

The chat template opens `<think>` in the prompt, so output normally starts inside reasoning and
only a `</think>` ends it (the `nano_v3` / `nemotron_v3` behaviour). On top of that parser:

* `<tool_call>` also ends reasoning (the model sometimes skips `</think>` before a call); the
  `<tool_call>` text goes to content, where the tool parser finds it (only when tool calls are
  parsed for the request: otherwise it is just reasoning text);
* with thinking off (the prompt ends in `<think></think>`), everything is content and stray think
  markers are dropped;
* a response cut short inside reasoning keeps its reasoning (content stays empty);
* leading whitespace of content is dropped (the model writes `</think>\\n`).

One class serves streaming and non-streaming: non-streaming is `feed(whole_text)` + `finish()`.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt's last think marker is an opening `<think>` (thinking on)."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def held_back_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class ReasoningParser:
    """A streaming state machine: reasoning until `</think>` or `<tool_call>`, then content."""

    def __init__(self, reasoning_open: bool, tool_call_ends_reasoning: bool = True):
        self.thinking = reasoning_open
        self.in_reasoning = reasoning_open
        self._markers = (THINK_END, TOOL_CALL_START, THINK_START) if tool_call_ends_reasoning else (THINK_END, THINK_START)
        self._pending = ""  # text held back because it may be the start of a marker
        self._content_started = False

    def feed(self, text: str) -> ReasoningDelta:
        out = ReasoningDelta()
        buf = self._pending + text
        self._pending = ""
        while buf:
            if self.in_reasoning:
                buf = self._reasoning_step(buf, out)
            elif self.thinking:
                self._emit_content(buf, out)  # after an explicit end, content is verbatim
                buf = ""
            else:
                buf = self._thinking_off_step(buf, out)
        return out

    def finish(self) -> ReasoningDelta:
        """Flush what was held back: a cut-off response keeps its partial text."""
        out = ReasoningDelta()
        text, self._pending = self._pending, ""
        if self.in_reasoning:
            out.reasoning += text
        else:
            self._emit_content(text, out)
        return out

    # ---- states ---------------------------------------------------------------------------
    def _reasoning_step(self, buf: str, out: ReasoningDelta) -> str:
        markers = self._markers
        pos, marker = earliest_marker(buf, markers)
        if marker is None:
            keep = held_back_suffix(buf, markers)
            out.reasoning += buf[: len(buf) - keep]
            self._pending = buf[len(buf) - keep :]
            return ""
        out.reasoning += buf[:pos]
        if marker == THINK_START:  # a repeated opening tag carries no text
            return buf[pos + len(marker) :]
        self.in_reasoning = False
        if marker == TOOL_CALL_START:
            return buf[pos:]  # implicit end of reasoning: the call itself is content
        return buf[pos + len(marker) :]

    def _thinking_off_step(self, buf: str, out: ReasoningDelta) -> str:
        markers = (THINK_START, THINK_END)
        pos, marker = earliest_marker(buf, markers)
        if marker is None:
            keep = held_back_suffix(buf, markers)
            self._emit_content(buf[: len(buf) - keep], out)
            self._pending = buf[len(buf) - keep :]
            return ""
        self._emit_content(buf[:pos], out)
        return buf[pos + len(marker) :]

    def _emit_content(self, text: str, out: ReasoningDelta) -> None:
        if not self._content_started:
            text = text.lstrip()
            self._content_started = bool(text)
        out.content += text


def earliest_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """(position, marker) of the first marker in text, or (len(text), None)."""
    best, found = len(text), None
    for marker in markers:
        pos = text.find(marker)
        if pos != -1 and pos < best:
            best, found = pos, marker
    return best, found
