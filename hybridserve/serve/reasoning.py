"""Split Nemotron output into reasoning and content, fed as text deltas.

The chat template opens `<think>` in the prompt, so output normally starts inside reasoning and
only a `</think>` ends it (the `nano_v3` / `nemotron_v3` behaviour). On top of that parser:

* `<tool_call>` also ends reasoning (the model sometimes skips `</think>` before a call) once the
  call is real: text from `<tool_call>` on is held back until a `</function>` or `</tool_call>`
  shows a call (the reasoning ended at `<tool_call>`; the call goes to content, where the tool
  parser finds it) or a `</think>` comes first (an unfinished call inside reasoning is reasoning,
  as nano_v3 reads it). Only when tool calls are parsed for the request: otherwise `<tool_call>`
  is just reasoning text;
* with thinking off (the prompt ends in `<think></think>`), output is content, but a model that
  thinks anyway is split: `<think>X</think>Y` gives reasoning X and content Y; and `X</think>Y`
  too when the parser may hold text until it knows (`hindsight`, non-streaming responses: a
  stream cannot take back text it already sent as content, so there the stray `</think>` is
  dropped);
* a response cut short inside reasoning keeps its reasoning (content stays empty);
* leading whitespace of content is dropped (the model writes `</think>\\n`).

One class serves streaming and non-streaming: non-streaming is `feed(whole_text)` + `finish()`.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
CALL_CLOSERS = ("</function>", "</tool_call>")  # seen before `</think>`: the held call is real


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
    """A streaming state machine: reasoning until `</think>` (or a real `<tool_call>`), then content.

    `undecided` is true while text is held whose side is not known yet; when it is settled,
    `held_was_reasoning` says which way it went (callers count reasoning tokens with it)."""

    def __init__(self, reasoning_open: bool, tool_call_ends_reasoning: bool = True, hindsight: bool = False):
        self.in_reasoning = reasoning_open
        self.held_was_reasoning = False
        self._calls = tool_call_ends_reasoning
        self._markers = (THINK_END, TOOL_CALL_START, THINK_START) if tool_call_ends_reasoning else (THINK_END, THINK_START)
        self._ended = False  # an explicit end of reasoning passed: content is verbatim from here
        self._held: str | None = None if reasoning_open or not hindsight else ""
        self._held_in_reasoning = False  # the held text began inside reasoning (at a `<tool_call>`)
        self._pending = ""  # text held back because it may be the start of a marker
        self._content_started = False

    @property
    def undecided(self) -> bool:
        return self._held is not None

    def feed(self, text: str) -> ReasoningDelta:
        out = ReasoningDelta()
        buf = self._pending + text
        self._pending = ""
        while buf:
            if self._held is not None:
                buf = self._held_step(buf, out)
            elif self.in_reasoning:
                buf = self._reasoning_step(buf, out)
            elif self._ended:
                self._emit_content(buf, out)
                buf = ""
            else:
                buf = self._thinking_off_step(buf, out)
        return out

    def finish(self) -> ReasoningDelta:
        """Flush what was held back: a cut-off response keeps its partial text; held text that
        no `</think>` claimed is content (a call, or a thinking-off answer)."""
        out = ReasoningDelta()
        if self._held is not None:
            held, self._held = self._held + self._pending, None
            self._pending = ""
            self.in_reasoning, self._ended = False, self._held_in_reasoning
            out = self.feed(held)
        text, self._pending = self._pending, ""
        if self.in_reasoning:
            out.reasoning += text
        else:
            self._emit_content(text, out)
        return out

    # ---- states ---------------------------------------------------------------------------
    def _reasoning_step(self, buf: str, out: ReasoningDelta) -> str:
        pos, marker = earliest_marker(buf, self._markers)
        if marker is None:
            keep = held_back_suffix(buf, self._markers)
            out.reasoning += buf[: len(buf) - keep]
            self._pending = buf[len(buf) - keep :]
            return ""
        out.reasoning += buf[:pos]
        if marker == THINK_START:  # a repeated opening tag carries no text
            return buf[pos + len(marker) :]
        if marker == TOOL_CALL_START:  # maybe the implicit end of reasoning: hold until it is clear
            self._held, self._held_in_reasoning, self.held_was_reasoning = "", True, False
            return buf[pos:]
        self.in_reasoning, self._ended = False, True
        return buf[pos + len(marker) :]

    def _held_step(self, buf: str, out: ReasoningDelta) -> str:
        self._held += buf
        markers = (THINK_END, *CALL_CLOSERS) if self._calls else (THINK_END,)
        pos, marker = earliest_marker(self._held, markers)
        if marker is None:
            return ""
        held, self._held = self._held, None
        self.in_reasoning = False
        if marker == THINK_END:
            self.held_was_reasoning, self._ended = True, True
            reasoning = held[:pos]
            if not self._held_in_reasoning and reasoning.lstrip().startswith(THINK_START):
                reasoning = reasoning.lstrip()  # as a stream reads it: the model opened with <think>
            out.reasoning += reasoning.replace(THINK_START, "")
            return held[pos + len(marker) :]
        self._ended = self._held_in_reasoning  # a real call: reasoning ended where the hold began
        return held

    def _thinking_off_step(self, buf: str, out: ReasoningDelta) -> str:
        markers = (THINK_START, THINK_END)
        pos, marker = earliest_marker(buf, markers)
        if marker is None:
            keep = held_back_suffix(buf, markers)
            self._emit_content(buf[: len(buf) - keep], out)
            self._pending = buf[len(buf) - keep :]
            return ""
        if marker == THINK_START and not self._content_started and not buf[:pos].strip():
            self.in_reasoning = True  # thinking is off, but the model opens with <think>: reasoning
            return buf[pos + len(marker) :]
        self._emit_content(buf[:pos], out)  # a stray marker is dropped
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
