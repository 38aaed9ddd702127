"""Chat messages -> prompt text and token ids, through the tokenizer's own chat template.

OpenAI-style history is normalised first: text content parts are joined, `reasoning` is accepted
as `reasoning_content`, `developer` is a system turn, and historical tool-call `arguments` (JSON
strings on the wire) become mappings, as the Nemotron template requires; malformed JSON is a 400
naming the message. Also here: the token ids the engine needs for a thinking budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hybridserve.serve.errors import bad_request
from hybridserve.serve.protocol import ChatMessage
from hybridserve.serve.reasoning import THINK_END, TOOL_CALL_START, prompt_opens_reasoning

THINKING_GRACE_TOKENS = 32  # after the budget, wait this long for a line end before forcing </think>


@dataclass
class RenderedChat:
    prompt: str
    prompt_token_ids: list[int]
    reasoning_open: bool  # the prompt ends inside <think>: output starts as reasoning


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, msg in enumerate(messages):
        m: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role}
        m["content"] = _text_content(msg.content, i)
        if msg.name is not None:
            m["name"] = msg.name
        if msg.tool_call_id is not None:
            m["tool_call_id"] = msg.tool_call_id
        reasoning = msg.reasoning_content if msg.reasoning_content is not None else msg.reasoning
        if reasoning is not None:
            m["reasoning_content"] = reasoning
        if msg.tool_calls:
            m["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name,
                              "arguments": _arguments(call.function.arguments, i, j)}}
                for j, call in enumerate(msg.tool_calls)
            ]
        out.append(m)
    return out


def _text_content(content: str | list[dict[str, Any]] | None, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{i}].content: only text content parts are supported "
                              f"(got type {part.get('type')!r})", f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def _arguments(arguments: str | dict[str, Any] | None, i: int, j: int) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    param = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        parsed = json.loads(arguments)
    except ValueError as e:
        raise bad_request(f"{param} is not valid JSON ({e})", param) from None
    if not isinstance(parsed, dict):
        raise bad_request(f"{param} must be a JSON object", param)
    return parsed


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                template_kwargs: dict[str, Any], add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> RenderedChat:
    """Apply the chat template; any template failure is the request's fault (400), never a 500."""
    if continue_final_message and add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    kwargs = {k: v for k, v in template_kwargs.items()
              if k not in ("messages", "tools", "add_generation_prompt", "tokenize", "continue_final_message")}
    try:
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **kwargs)
    except Exception as e:  # jinja errors, bad kwargs, template-raised exceptions
        raise bad_request(f"chat template could not render these messages: {e}", "messages") from None
    if not isinstance(prompt, str):
        raise bad_request("chat template did not produce text", "messages")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return RenderedChat(prompt, ids, prompt_opens_reasoning(prompt))


@dataclass(frozen=True)
class ThinkingTokens:
    end_token_id: int
    newline_token_ids: tuple[int, ...]
    implicit_end_token_ids: tuple[int, ...]  # `<tool_call>`: the model may open a call without `</think>`


_thinking_cache: dict[int, ThinkingTokens | None] = {}


def thinking_tokens(tokenizer: Any) -> ThinkingTokens | None:
    """Ids for the engine's thinking budget: `</think>` and every token whose text has a newline."""
    key = id(tokenizer)
    if key not in _thinking_cache:
        end = tokenizer.convert_tokens_to_ids(THINK_END)
        if not isinstance(end, int) or end == tokenizer.unk_token_id:
            _thinking_cache[key] = None
        else:
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            newlines = tuple(i for i, t in enumerate(texts) if "\n" in t and i != end)
            tool_call = tokenizer.convert_tokens_to_ids(TOOL_CALL_START)
            implicit = (tool_call,) if isinstance(tool_call, int) and tool_call != tokenizer.unk_token_id else ()
            _thinking_cache[key] = ThinkingTokens(end, newlines, implicit)
    return _thinking_cache[key]
