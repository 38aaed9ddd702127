"""POST /v1/completions: raw prompts (text, token ids, or a bounded list of either), no chat parsing.

Each prompt is one engine request; choice index = prompt index * n + sequence index. Streaming
merges the prompts' outputs as they arrive, one chunk per step; the output is raw model text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from hybridserve.sampling_params import SamplingParams
from hybridserve.serve.context import ServerContext, engine_outputs
from hybridserve.serve.errors import bad_request
from hybridserve.serve.protocol import CompletionRequest
from hybridserve.serve.request_checks import warn_unknown_fields
from hybridserve.serve.responses import (
    Chunk,
    TokenText,
    completion_logprobs,
    echo_logprobs,
    joined_logprobs,
    new_id,
    now,
    reported_stop_reason,
    respond,
    sse_stream,
    usage,
    vllm_prompt_logprobs,
)
from hybridserve.serve.sampling import build_sampling_params, resolve_max_tokens
from hybridserve.serve.structured_outputs import structured_spec


def _prompts(ctx: ServerContext, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt, validated. Blocking (tokenizes): run it with ctx.offload."""
    items = req.prompts()
    out = []
    for k, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{k}]"
        if isinstance(item, str):
            ids = ctx.encode(item, param)
            text: str | None = item
        else:
            ids, text = list(item), None
            ctx.check_token_ids(ids, param)
        if not ids:
            raise bad_request("prompt must not be empty", param)
        out.append((text, ids))
    return out


async def create_completion(ctx: ServerContext, request: Request, req: CompletionRequest) -> Response:
    arrival = time.monotonic()
    ctx.check_model(req.model)
    warn_unknown_fields(req)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (beam-style best_of is not supported)", "best_of")
    num_prompts = len(req.prompts())
    ticket = ctx.tracker.admit(num_prompts * req.n, "n" if req.n > 1 or num_prompts == 1 else "prompt")
    try:
        prompts = await ctx.offload(_prompts, ctx, req)
        structured = await ctx.offload(structured_spec, req, ctx.tokenizer)
        params = []
        for k, (_, ids) in enumerate(prompts):
            max_tokens = resolve_max_tokens(req.max_tokens, len(ids), ctx.max_model_len,
                                            ctx.settings.default_max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{k}]")
            params.append(build_sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                                defaults=ctx.settings.generation_defaults,
                                                vocab_size=ctx.vocab_size, structured=structured,
                                                prompt_logprobs=_prompt_logprobs_asked(req)))
    except BaseException:
        ticket.release()
        raise
    base_id = req.request_id or new_id("cmpl")
    ids_of = [base_id] if len(prompts) == 1 else [f"{base_id}-{k}" for k in range(len(prompts))]
    streams = [engine_outputs(ctx, ids, p, rid, arrival) for (_, ids), p, rid in zip(prompts, params, ids_of)]
    run = _CompletionRun(ctx, req, base_id, prompts, params)
    return await respond(request, ticket.release, _merge(streams), req.stream, run.collect, run.sse)


def _prompt_logprobs_asked(req: CompletionRequest) -> int | None:
    """Alternatives per prompt token the engine must score: for `echo` + `logprobs` and for vLLM's
    `prompt_logprobs` field (the larger when both are set); None when neither needs them."""
    asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    return max(asked) if asked else None


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, output) from several streams, in arrival order; closing it closes them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(k: int, s: AsyncIterator[Any]) -> None:
        try:
            async for out in s:
                await queue.put((k, out))
        except Exception as e:  # forwarded to the consumer
            await queue.put((k, e))
            return
        await queue.put((k, done))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            k, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


class _CompletionRun:
    def __init__(self, ctx: ServerContext, req: CompletionRequest, request_id: str,
                 prompts: list[tuple[str | None, list[int]]], params: list[SamplingParams]):
        self.ctx, self.req, self.id = ctx, req, request_id
        self.created, self.model = now(), ctx.settings.model_name
        self.prompts, self.params = prompts, params
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.completion_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}  # per prompt: tokens from the prefix cache
        self.text_of = TokenText(ctx.tokenizer) if req.logprobs is not None else None

    def _echo(self, k: int) -> str:
        text, ids = self.prompts[k]
        return text if text is not None else self.ctx.tokenizer.decode(ids)

    def _choice_logprobs(self, k: int, out: Any, generated: list, offset: int,
                         with_prompt: bool) -> tuple[dict[str, Any] | None, int]:
        """A choice's legacy logprobs (the echoed prompt's first when `with_prompt`), and the offset
        after them. `out` is the prompt's RequestOutput, which carries its prompt logprobs."""
        if self.text_of is None:
            return None, offset
        top = self.req.logprobs or 0
        lp, end = completion_logprobs(generated, self.text_of, top, offset)
        if with_prompt and self.req.echo and out.prompt_logprobs is not None:
            lp = joined_logprobs(echo_logprobs(self.prompts[k][1], out.prompt_logprobs, self.text_of, top), lp)
        return lp, end

    def _prompt_field(self, out: Any) -> dict[str, Any]:
        """vLLM's `prompt_logprobs` choice field, when the request asked for it."""
        if self.req.prompt_logprobs is None or out.prompt_logprobs is None:
            return {}
        keep = self.req.prompt_logprobs + 1  # the prompt token and its top alternatives
        entries = [None if e is None else e[:keep] for e in out.prompt_logprobs]
        return {"prompt_logprobs": vllm_prompt_logprobs(entries, TokenText(self.ctx.tokenizer))}

    def _usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, sum(self.completion_tokens.values()),
                     cached_tokens=sum(self.cached_tokens.values()))

    async def collect(self, merged: AsyncIterator[tuple[int, Any]]) -> dict[str, Any]:
        finals: dict[int, Any] = {}
        async for k, out in merged:
            finals[k] = out
            self.cached_tokens[k] = out.num_cached_tokens
        choices = []
        for k, final in sorted(finals.items()):
            prefix = self._echo(k) if self.req.echo else ""
            for o in sorted(final.outputs, key=lambda o: o.index):
                index = k * self.req.n + o.index
                self.completion_tokens[index] = len(o.token_ids)
                lp, _ = self._choice_logprobs(k, final, o.logprobs or [], len(prefix), with_prompt=True)
                choices.append({"index": index, "text": prefix + o.text, "logprobs": lp,
                                "finish_reason": o.finish_reason,
                                "stop_reason": reported_stop_reason(o.stop_reason, self.params[k]),
                                **self._prompt_field(final)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    def sse(self, first: tuple[int, Any], merged: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[bytes]:
        head = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        return sse_stream(head, self._chunks(first, merged), self.req.stream_options)

    async def _chunks(self, first: tuple[int, Any], merged: AsyncIterator[tuple[int, Any]]) -> AsyncGenerator[Chunk, None]:
        """One chunk per choice per step (as OpenAI and vLLM send n > 1 and several prompts)."""
        started: set[int] = set()
        offsets: dict[int, int] = {}  # next logprobs text_offset per choice, counted per token
        finished: set[int] = set()
        item: tuple[int, Any] | None = first
        while item is not None:
            k, out = item
            self.cached_tokens[k] = out.num_cached_tokens
            for o in out.outputs:
                index = k * self.req.n + o.index
                if index in finished or not (o.text_delta or o.token_ids_delta or o.finish_reason):
                    continue
                self.completion_tokens[index] = len(o.token_ids)
                first_chunk = index not in started
                prefix = self._echo(k) if self.req.echo and first_chunk else ""
                if first_chunk:
                    started.add(index)
                    offsets[index] = len(prefix)  # offsets count the echoed prompt too
                lp = None
                if o.logprobs_delta or (first_chunk and self.req.echo):
                    lp, offsets[index] = self._choice_logprobs(k, out, o.logprobs_delta or [], offsets[index],
                                                               with_prompt=first_chunk)
                if o.finish_reason:
                    finished.add(index)
                yield Chunk([{"index": index, "text": prefix + o.text_delta, "logprobs": lp,
                              "finish_reason": o.finish_reason,
                              "stop_reason": reported_stop_reason(o.stop_reason, self.params[k]),
                              **(self._prompt_field(out) if first_chunk else {})}], self._usage())
            item = await anext(merged, None)
        yield Chunk([], self._usage())
