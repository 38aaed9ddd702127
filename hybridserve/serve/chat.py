"""Chat messages -> prompt text and token ids, through the tokenizer's own chat template.

OpenAI-style history is normalised first: text content parts are joined, `reasoning` is accepted
as `reasoning_content`, `developer` is a system turn, and historical tool-call `arguments` (JSON
strings on the wire) become mappings, as the Nemotron template requires; malformed JSON is a 400
naming the message. A template sent in the request (`chat_template`, or inside
`chat_template_kwargs`) is refused unless the server trusts request templates, and even then runs
in `template_sandbox`'s bounded child process. Rendering and tokenizing block: the server calls
`render_chat` from its preprocessing threads, never on the event loop. Also here: the token ids
the engine needs for a thinking budget.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from hybridserve.serve.errors import bad_request
from hybridserve.serve.protocol import ChatMessage
from hybridserve.serve.reasoning import THINK_END, TOOL_CALL_START, prompt_opens_reasoning
from hybridserve.serve.template_sandbox import TemplateLimitError, render_request_template

THINKING_GRACE_TOKENS = 32  # after the budget, wait this long for a line end before forcing </think>
# apply_chat_template's own arguments: never taken from chat_template_kwargs (they would change how it
# renders or what it returns, not what the template sees); `chat_template` is gated by `request_template`.
_RENDER_ARGUMENTS = (frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
                     - {"kwargs", "documents"}) | {"messages"}


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


def request_template(chat_template: Any, template_kwargs: dict[str, Any], trusted: bool) -> str | None:
    """The template a request brings (top-level `chat_template` or inside `chat_template_kwargs`), if any.
    A template is code: without --trust-request-chat-template it is refused, never silently ignored."""
    found = None
    for param, value in (("chat_template", chat_template),
                         ("chat_template_kwargs.chat_template", template_kwargs.get("chat_template"))):
        if value is None:
            continue
        if not trusted:
            raise bad_request(f"{param}: this server does not render chat templates sent in requests (a template "
                              "runs code on the server); start it with --trust-request-chat-template to allow them",
                              param)
        if not isinstance(value, str):
            raise bad_request(f"{param} must be a string", param)
        found = found or value
    return found


def check_prompt_chars(text: str, max_chars: int, param: str) -> None:
    """Refuse text too long to fit the context before paying to tokenize it."""
    if len(text) > max_chars:
        raise bad_request(f"{param}: the prompt is {len(text)} characters long; at most {max_chars} are accepted "
                          "(--max-prompt-chars), more than the model's context can hold", param)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                template_kwargs: dict[str, Any], add_generation_prompt: bool = True,
                continue_final_message: bool = False, *, template: str | None = None,
                max_chars: int | None = None) -> RenderedChat:
    """Apply the chat template (`template`: a trusted request's own) and tokenize; any template failure is
    the request's fault (400), never a 500. Blocking."""
    if continue_final_message and add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    variables = {k: v for k, v in template_kwargs.items() if k not in _RENDER_ARGUMENTS}
    try:
        if template is None:
            prompt = tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **variables)
        else:
            prompt = render_request_template(template, messages, tools or None, add_generation_prompt,
                                             continue_final_message, {**tokenizer.special_tokens_map, **variables},
                                             max_chars or 1 << 62)
    except TemplateLimitError as e:
        raise bad_request(str(e), "chat_template") from None
    except Exception as e:  # jinja errors, bad kwargs, template-raised exceptions
        raise bad_request(f"chat template could not render these messages: {e}", "messages") from None
    if not isinstance(prompt, str):
        raise bad_request("chat template did not produce text", "messages")
    if max_chars is not None:
        check_prompt_chars(prompt, max_chars, "messages")
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
