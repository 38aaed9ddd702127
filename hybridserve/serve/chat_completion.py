"""POST /v1/chat/completions: messages -> template -> engine -> reasoning / content / tool calls.

Streaming sends one chunk per engine step (one token per step) from the first visible text on, no
empty first chunk (a step with nothing visible, such as `</think>`, then sends an empty delta), `finish_reason` on the last chunk of each choice, an optional usage chunk, then
`[DONE]`. Non-streaming folds exactly the same deltas. `tool_choice` "required" or a named function
is enforced by a grammar (`structured_outputs.py`), as are `response_format` and the other
structured-output fields.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from hybridserve.sampling_params import SamplingParams
from hybridserve.serve.chat import THINKING_GRACE_TOKENS, RenderedChat, thinking_tokens
from hybridserve.serve.chat_output import ChatOutputParser, ChoiceAccumulator, ChoiceDelta
from hybridserve.serve.context import ServerContext, engine_outputs
from hybridserve.serve.errors import bad_request
from hybridserve.serve.protocol import ChatCompletionRequest
from hybridserve.serve.request_checks import warn_unknown_fields
from hybridserve.serve.responses import (
    Chunk,
    TokenText,
    chat_logprobs,
    new_id,
    now,
    reported_stop_reason,
    respond,
    sse_stream,
    usage,
)
from hybridserve.serve.sampling import build_sampling_params, resolve_max_tokens
from hybridserve.serve.structured_outputs import structured_spec


class _ToolPolicy:
    def __init__(self, req: ChatCompletionRequest):
        self.tools = [t.model_dump(exclude_unset=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        if choice is None:
            choice = "auto" if self.tools else "none"
        self.function: str | None = None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise bad_request('tool_choice must be "none", "auto", "required" or '
                                  '{"type": "function", "function": {"name": ...}}', "tool_choice")
            self.function = name
            choice = "named"
        if choice != "none" and not self.tools:
            raise bad_request(f"tool_choice {choice!r} needs a non-empty tools list", "tool_choice")
        if self.function is not None and self.function not in {t["function"]["name"] for t in self.tools or []}:
            raise bad_request(f"tool_choice names function {self.function!r}, which is not in tools", "tool_choice")
        self.choice = choice
        self.parallel = req.parallel_tool_calls

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools in play: shown to the model by the template and parsed from its output."""
        return None if self.choice == "none" else self.tools

    def parser(self, reasoning_open: bool, hindsight: bool) -> ChatOutputParser:
        return ChatOutputParser(reasoning_open, self.template_tools, self.function, self.parallel, hindsight)

    @property
    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools a call must be made from (required / named), None when the model may answer."""
        return self.tools if self.choice in ("required", "named") else None


def _thinking_budget(ctx: ServerContext, req: ChatCompletionRequest, kwargs: dict[str, Any]) -> int | None:
    """The first budget the request gives, bounded by the context (a larger one could never be reached)."""
    for param, budget in (("thinking_token_budget", req.thinking_token_budget),
                          ("reasoning_budget", req.reasoning_budget),
                          ("chat_template_kwargs.reasoning_budget", kwargs.get("reasoning_budget"))):
        if budget is not None:
            if not (isinstance(budget, int) and not isinstance(budget, bool) and 0 <= budget <= ctx.max_model_len):
                raise bad_request(f"{param} must be an integer in [0, {ctx.max_model_len}] (max_model_len)", param)
            return budget
    return ctx.settings.default_thinking_budget


def _sampling_params(ctx: ServerContext, req: ChatCompletionRequest, rendered: RenderedChat,
                     policy: _ToolPolicy) -> SamplingParams:
    requested, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
    max_tokens = resolve_max_tokens(requested, len(rendered.prompt_token_ids), ctx.max_model_len,
                                    ctx.settings.default_max_tokens, max_tokens_param=param)
    extra: dict[str, Any] = {}
    budget = _thinking_budget(ctx, req, req.chat_template_kwargs or {})
    if budget is not None and rendered.reasoning_open:
        ids = thinking_tokens(ctx.tokenizer)
        if ids is None:
            raise bad_request("this tokenizer has no </think> token; a thinking budget cannot be applied",
                              "thinking_token_budget")
        extra = {"thinking_budget": budget, "thinking_end_token_id": ids.end_token_id,
                 "thinking_grace_tokens": THINKING_GRACE_TOKENS, "newline_token_ids": list(ids.newline_token_ids),
                 "thinking_implicit_end_token_ids": list(ids.implicit_end_token_ids)}
    extra["structured"] = structured_spec(req, ctx.tokenizer, reasoning_open=rendered.reasoning_open,
                                          tools=policy.forced_tools, tool_function=policy.function,
                                          parallel_tool_calls=policy.parallel)
    top = (req.top_logprobs or 0) if req.logprobs else None
    return build_sampling_params(req, max_tokens=max_tokens, logprobs=top, defaults=ctx.settings.generation_defaults,
                                 vocab_size=ctx.vocab_size, **extra)


async def create_chat_completion(ctx: ServerContext, request: Request, req: ChatCompletionRequest) -> Response:
    arrival = time.monotonic()
    ctx.check_model(req.model)
    warn_unknown_fields(req)
    policy = _ToolPolicy(req)
    ticket = ctx.tracker.admit(req.n)
    try:
        rendered = await ctx.render_chat(req, policy.template_tools)
        params = await ctx.offload(_sampling_params, ctx, req, rendered, policy)  # the grammar is checked here
    except BaseException:
        ticket.release()
        raise
    request_id = req.request_id or new_id("chatcmpl")
    outputs = engine_outputs(ctx, rendered.prompt_token_ids, params, request_id, arrival)
    run = _ChatRun(ctx, req, policy, rendered.reasoning_open, request_id, len(rendered.prompt_token_ids), params)
    return await respond(request, ticket.release, outputs, req.stream, run.collect, run.sse)


class _ChatRun:
    """The per-request state shared by the streaming and non-streaming paths."""

    def __init__(self, ctx: ServerContext, req: ChatCompletionRequest, policy: _ToolPolicy, reasoning_open: bool,
                 request_id: str, prompt_tokens: int, params: SamplingParams):
        self.ctx, self.req, self.params = ctx, req, params
        self.id, self.created, self.model = request_id, now(), ctx.settings.model_name
        self.prompt_tokens = prompt_tokens
        # non-streaming may hold text until its side is known (see reasoning.py); a stream may not
        self.parsers = [policy.parser(reasoning_open, hindsight=not req.stream) for _ in range(req.n)]
        self.reasoning_tokens = [0] * req.n
        self.held_tokens = [0] * req.n  # generated while the parser held undecided text
        self.completion_tokens = [0] * req.n
        self.cached_tokens = 0  # prompt tokens from the prefix cache
        self.finished = [False] * req.n
        self.started = [False] * req.n  # streaming: role sent
        self.text_of = TokenText(ctx.tokenizer) if req.logprobs else None

    def _step(self, o: Any) -> ChoiceDelta:
        i, parser, new_tokens = o.index, self.parsers[o.index], len(o.token_ids_delta)
        was_undecided = parser.undecided
        if parser.in_reasoning and not was_undecided:
            self.reasoning_tokens[i] += new_tokens
        self.completion_tokens[i] = len(o.token_ids)
        final = o.finish_reason is not None and not self.finished[i]
        self.finished[i] = self.finished[i] or final
        delta = parser.feed(o.text_delta, final=final)
        if was_undecided:
            self.held_tokens[i] += new_tokens
        if not parser.undecided and self.held_tokens[i]:
            self.reasoning_tokens[i] += self.held_tokens[i] if parser.held_was_reasoning else 0
            self.held_tokens[i] = 0
        return delta

    def _finish_reason(self, i: int, reason: str | None) -> str | None:
        if reason == "stop" and self.parsers[i].num_tool_calls:
            return "tool_calls"
        return reason

    def _usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, sum(self.completion_tokens), sum(self.reasoning_tokens), self.cached_tokens)

    async def collect(self, stream: AsyncIterator[Any]) -> dict[str, Any]:
        accs = [ChoiceAccumulator() for _ in range(self.req.n)]
        logprobs: list[list[Any]] = [[] for _ in range(self.req.n)]
        reasons: list[Any] = [None] * self.req.n
        stop_reasons: list[Any] = [None] * self.req.n
        async for out in stream:
            self.cached_tokens = out.num_cached_tokens
            for o in out.outputs:
                if self.finished[o.index]:
                    continue
                accs[o.index].add(self._step(o))
                logprobs[o.index].extend(o.logprobs_delta or [])
                reasons[o.index] = o.finish_reason
                stop_reasons[o.index] = reported_stop_reason(o.stop_reason, self.params)
        choices = []
        for i, acc in enumerate(accs):
            message = {"role": "assistant", "content": acc.content or None, "reasoning": acc.reasoning or None,
                       "reasoning_content": acc.reasoning or None, "tool_calls": acc.tool_calls}
            lp = chat_logprobs(logprobs[i], self.text_of, self.req.top_logprobs or 0) if self.text_of else None
            choices.append({"index": i, "message": message, "logprobs": lp,
                            "finish_reason": self._finish_reason(i, reasons[i]), "stop_reason": stop_reasons[i]})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    def _chunk_choice(self, o: Any) -> dict[str, Any] | None:
        """One choice's entry in a stream chunk; None only before the choice's first visible text (no
        empty first chunk). Later steps always send one, empty or not: one chunk per token, which is
        what `vllm bench serve` counts inter-token latency by."""
        i = o.index
        delta = self._step(o)
        lp = None
        if self.text_of and o.logprobs_delta:
            lp = chat_logprobs(o.logprobs_delta, self.text_of, self.req.top_logprobs or 0)
        if not (delta or lp or self.finished[i] or self.started[i]):
            return None  # e.g. text held back at a possible tag before anything was shown
        d: dict[str, Any] = {}
        if not self.started[i]:
            d["role"] = "assistant"
            self.started[i] = True
        d["content"] = delta.content or None
        d["reasoning"] = d["reasoning_content"] = delta.reasoning or None
        if delta.tool_calls:
            d["tool_calls"] = delta.tool_calls
        reason = self._finish_reason(i, o.finish_reason) if self.finished[i] else None
        stop_reason = reported_stop_reason(o.stop_reason, self.params) if self.finished[i] else None
        return {"index": i, "delta": d, "logprobs": lp, "finish_reason": reason, "stop_reason": stop_reason}

    def sse(self, first: Any, stream: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        return sse_stream(head, self._chunks(first, stream), self.req.stream_options)

    async def _chunks(self, first: Any, stream: AsyncIterator[Any]) -> AsyncGenerator[Chunk, None]:
        out = first
        while out is not None:
            self.cached_tokens = out.num_cached_tokens
            live = [o for o in out.outputs if not self.finished[o.index]]
            for choice in map(self._chunk_choice, live):  # one chunk per choice, as OpenAI and vLLM send n > 1
                if choice is not None:
                    yield Chunk([choice], self._usage())
            out = await anext(stream, None)
        yield Chunk([], self._usage())
