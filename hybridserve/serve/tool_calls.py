"""Parse Nemotron / qwen3_coder tool calls from content text, fed as deltas.

Format: `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`,
several calls per message. `ToolCallParser` is a structural state machine: `feed(delta)` returns
events (content text, a call's start with id and name, argument fragments), `finish()` closes
whatever is open. Non-streaming parsing is the same machine fed the whole text once, so both paths
give identical results by construction.

Invariants: the argument fragments of one call concatenate to exactly `json.dumps(arguments,
ensure_ascii=False)`; no tool-call markup ever appears in content; a parameter ends at
`</parameter>`, the next `<parameter=`, `</function>`, `</tool_call>` or the end of output (the
model sometimes omits the last `</parameter>`). Content is the text before the first call with
trailing whitespace dropped; text between or after calls is not content (the format allows none).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hybridserve.serve.reasoning import earliest_marker, held_back_suffix
from hybridserve.serve.tool_schema import convert_parameter, inline_refs, is_streamable_string

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
FUNC_START = "<function="
FUNC_END = "</function>"
PARAM_START = "<parameter="
PARAM_END = "</parameter>"
MAX_NAME_LEN = 256
VALID_NAME = re.compile(r"[^\s{}<>\"'=/]+")


@dataclass
class ContentText:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArguments:
    index: int
    fragment: str


Event = ContentText | ToolCallStart | ToolCallArguments


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_parameter_schemas(tools: Iterable[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{function name: {parameter name: property schema}} from OpenAI-style tool definitions."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        props = props if isinstance(props, dict) else {}
        out[fn["name"]] = {k: inline_refs(v, params) for k, v in props.items()}
    return out


@dataclass
class _Call:
    index: int
    name: str
    schemas: dict[str, Any] | None  # None: unknown tool, every value stays a string
    opened: bool = False  # "{" sent
    param: str | None = None
    param_streaming: bool = False
    value: str = ""  # raw text of the current parameter (whole-value mode)
    value_started: bool = False  # streaming mode: first character seen (leading "\n" handled)
    held_newline: bool = False  # streaming mode: a "\n" that may be the value's last character


class ToolCallParser:
    """Streaming state machine over content text; see the module docstring."""

    def __init__(
        self,
        tools: Iterable[dict[str, Any]] | None = None,
        id_factory: Callable[[], str] = new_call_id,
    ):
        self._schemas = tool_parameter_schemas(tools)
        self._new_id = id_factory
        self._buf = ""
        self._state = self._text
        self._call: _Call | None = None
        self._num_calls = 0
        self._events: list[Event] = []
        self._finishing = False

    @property
    def num_calls(self) -> int:
        return self._num_calls

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        while self._buf and self._state():
            pass
        return self._take_events()

    def finish(self) -> list[Event]:
        self._finishing = True
        while self._buf and self._state():
            pass
        if self._state == self._param_value:
            self._end_parameter("")
        self._buf = ""
        self._close_call()
        return self._take_events()

    # ---- helpers ---------------------------------------------------------------------------
    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _emit_content(self, text: str) -> None:
        if text:
            self._events.append(ContentText(text))

    def _args(self, fragment: str) -> None:
        assert self._call is not None
        if not self._call.opened:
            fragment = "{" + fragment
            self._call.opened = True
        self._events.append(ToolCallArguments(self._call.index, fragment))

    def _close_call(self) -> None:
        if self._call is not None:
            self._args("}")
            self._call = None

    def _find(self, markers: tuple[str, ...]) -> tuple[int, str | None]:
        """Earliest marker in the buffer, or (safe length, None) with a possible partial marker held back."""
        best, found = earliest_marker(self._buf, markers)
        if found is None and not self._finishing:
            best = len(self._buf) - held_back_suffix(self._buf, markers)
        return best, found

    def _skip_to(self, markers: tuple[str, ...]) -> str | None:
        """Drop text up to the earliest marker; return the marker (consumed) or None."""
        pos, marker = self._find(markers)
        if marker is None:
            self._buf = self._buf[pos:]
            return None
        self._buf = self._buf[pos + len(marker) :]
        return marker

    # ---- states: each returns True when it made progress -------------------------------------
    def _text(self) -> bool:
        pos, marker = self._find((CALL_START, FUNC_START))
        if marker is None:
            # hold trailing whitespace: it is dropped if a call follows
            safe = self._buf[:pos]
            keep = len(safe) - len(safe.rstrip())
            if not self._finishing:
                pos -= keep
            self._emit_content(self._buf[:pos])
            self._buf = self._buf[pos:]
            return False
        self._emit_content(self._buf[:pos].rstrip())
        self._buf = self._buf[pos + len(marker) :]
        self._state = self._inside_call if marker == CALL_START else self._function_name
        return True

    def _inside_call(self) -> bool:
        """After `<tool_call>` (or between calls): wait for `<function=`."""
        marker = self._skip_to((FUNC_START, CALL_END, CALL_START))
        if marker == FUNC_START:
            self._state = self._function_name
        return marker is not None

    def _function_name(self) -> bool:
        end = self._buf.find(">")
        if end == -1:
            if len(self._buf) > MAX_NAME_LEN:
                self._state = self._skip_call
                return True
            return False
        name = self._buf[:end].strip()
        self._buf = self._buf[end + 1 :]
        if not VALID_NAME.fullmatch(name) or len(name) > MAX_NAME_LEN:
            self._state = self._skip_call
            return True
        self._call = _Call(self._num_calls, name, self._schemas.get(name))
        self._num_calls += 1
        self._events.append(ToolCallStart(self._call.index, self._new_id(), name))
        self._state = self._function_body
        return True

    def _function_body(self) -> bool:
        """Inside `<function=...>`: parameters until the function (or call) ends."""
        marker = self._skip_to((PARAM_START, FUNC_END, CALL_END, FUNC_START, CALL_START))
        if marker is None:
            return False
        if marker == PARAM_START:
            self._state = self._parameter_name
            return True
        self._close_call()
        self._state = {
            FUNC_END: self._inside_call,
            CALL_END: self._inside_call,
            FUNC_START: self._function_name,
            CALL_START: self._inside_call,
        }[marker]
        return True

    def _parameter_name(self) -> bool:
        end, lt = self._buf.find(">"), self._buf.find("<")
        if (lt != -1 and (end == -1 or lt < end)) or (end == -1 and len(self._buf) > MAX_NAME_LEN):
            self._state = self._function_body  # malformed parameter header: skip it
            return True
        if end == -1:
            return False
        call = self._call
        assert call is not None
        call.param = self._buf[:end].strip()
        self._buf = self._buf[end + 1 :]
        schema = None if call.schemas is None else call.schemas.get(call.param)
        call.param_streaming = call.schemas is None or schema is None or is_streamable_string(schema)
        call.value, call.value_started, call.held_newline = "", False, False
        if call.param_streaming:
            self._args(_key_prefix(call) + '"')
        self._state = self._param_value
        return True

    def _param_value(self) -> bool:
        pos, marker = self._find(_VALUE_ENDS)
        chunk = self._buf[:pos]
        if marker is None:
            if self._finishing:  # output ended inside the value: drop a cut-off end tag
                chunk = chunk[: len(chunk) - held_back_suffix(chunk, _VALUE_ENDS)]
                pos = len(self._buf)
            self._buf = self._buf[pos:]
            self._value_text(chunk, final=False)
            return False
        self._buf = self._buf[pos + len(marker) :] if marker == PARAM_END else self._buf[pos:]
        self._end_parameter(chunk)
        return True

    def _skip_call(self) -> bool:
        """A call with an unusable function name: drop it entirely."""
        marker = self._skip_to((FUNC_END, CALL_END))
        if marker is not None:
            self._state = self._inside_call
        return marker is not None

    # ---- parameter values -------------------------------------------------------------------
    def _value_text(self, text: str, final: bool) -> None:
        call = self._call
        assert call is not None
        if not call.param_streaming:
            call.value += text
            return
        if call.held_newline:
            text, call.held_newline = "\n" + text, False
        if not call.value_started and text:
            call.value_started = True
            if text.startswith("\n"):
                text = text[1:]
        if not final and text.endswith("\n"):
            text, call.held_newline = text[:-1], True
        elif final and text.endswith("\n"):
            text = text[:-1]
        if text:
            self._args(json.dumps(text, ensure_ascii=False)[1:-1])

    def _end_parameter(self, text: str) -> None:
        call = self._call
        assert call is not None
        self._value_text(text, final=True)
        if call.param_streaming:
            self._args('"')
        else:
            value = call.value
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            schema = call.schemas.get(call.param) if call.schemas else None
            converted = convert_parameter(value, schema)
            try:
                encoded = json.dumps(converted, ensure_ascii=False, allow_nan=False)
            except ValueError:
                encoded = json.dumps(value, ensure_ascii=False)
            self._args(_key_prefix(call) + encoded)
        call.param = None
        self._state = self._function_body


_VALUE_ENDS = (PARAM_END, PARAM_START, FUNC_END, CALL_END)


def _key_prefix(call: _Call) -> str:
    sep = ", " if call.opened else ""
    return sep + json.dumps(call.param, ensure_ascii=False) + ": "
