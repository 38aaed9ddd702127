"""Response plumbing shared by chat and completions: usage, logprobs, SSE framing, disconnects.

`sse_stream` is the one SSE writer: chunk framing, usage (continuous or final), in-band error
frames and `[DONE]`, the same for chat and completions. `respond` turns one generation into a JSON body or an SSE stream and releases the admission ticket
and the engine request however the response ends (finished, client gone before or during the
body, server shutdown) — `ManagedStreamingResponse` runs the cleanup for streams, and
`until_disconnected` cancels non-streaming work when the client goes away (aborting its request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hybridserve.engine.outputs import TokenLogprob
from hybridserve.serve.errors import APIError, error_body

logger = logging.getLogger("hybridserve.serve")

SSE_DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(err: APIError) -> bytes:
    return sse(error_body(err.status, err.message, err.param, err.type))


@dataclass
class Chunk:
    """One stream chunk's choices and the usage so far; empty choices: the stream's totals, last."""

    choices: list[dict[str, Any]]
    usage: dict[str, Any]


async def sse_stream(head: dict[str, Any], chunks: AsyncGenerator[Chunk, None],
                     stream_options: Any) -> AsyncIterator[bytes]:
    """Frame `chunks` as SSE: `head` (id, object, created, model) + choices, usage on every chunk with
    `continuous_usage_stats` and in a last choice-less chunk with `include_usage`; a failure after
    the 200 is an in-band error frame (never a hang); `[DONE]` ends every stream exactly once."""
    include = bool(stream_options and stream_options.include_usage)
    continuous = include and bool(stream_options.continuous_usage_stats)
    try:
        try:
            async for chunk in chunks:
                if chunk.choices:
                    yield sse({**head, "choices": chunk.choices, **({"usage": chunk.usage} if continuous else {})})
                elif include:
                    yield sse({**head, "choices": [], "usage": chunk.usage})
        except APIError as e:
            yield sse_error(e)
        except Exception as e:
            logger.exception("stream %s failed", head["id"])
            yield sse_error(APIError(500, f"generation failed ({type(e).__name__})"))
        yield SSE_DONE
    finally:  # a client gone mid-stream closes this writer: close the chunk source with it
        await chunks.aclose()


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
          cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache supplied."""
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u


class TokenText:
    """Token id -> text for logprobs, cached (decoding single tokens is slow in bulk)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text


def chat_logprobs(per_token: list[list[TokenLogprob]], text_of: TokenText, top: int) -> dict[str, Any]:
    """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for entries in per_token:
        sampled, alternatives = entries[0], entries[1:]

        def item(lp: TokenLogprob) -> dict[str, Any]:
            t = text_of(lp.token_id)
            return {"token": t, "logprob": _finite(lp.logprob), "bytes": list(t.encode("utf-8"))}

        d = item(sampled)
        d["top_logprobs"] = [item(lp) for lp in alternatives[:top]]
        content.append(d)
    return {"content": content}


def completion_logprobs(per_token: list[list[TokenLogprob]], text_of: TokenText, top: int,
                        offset: int) -> tuple[dict[str, Any], int]:
    """Legacy completions format: parallel lists of tokens, logprobs, top dicts and text offsets.

    Each token's top dict holds the sampled token and the `top` most likely ones (so `logprobs: 0`
    still gives the sampled token's entry, as vLLM does); offsets count the tokens' own text from
    `offset`. Returns the lists and the offset after the last token (where a stream goes on)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entries in per_token:
        t = text_of(entries[0].token_id)
        tokens.append(t)
        token_logprobs.append(_finite(entries[0].logprob))
        tops.append({text_of(lp.token_id): _finite(lp.logprob) for lp in entries[: top + 1]})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset


def echo_logprobs(prompt_ids: list[int], entries: list[list[TokenLogprob] | None], text_of: TokenText,
                  top: int) -> dict[str, Any]:
    """The echoed prompt's part of legacy completions logprobs (`echo` with `logprobs`, as lm-eval
    scores text): one entry per prompt token from offset 0; the first token has no logprob (None),
    each later one is its own entry then its alternatives, as `completion_logprobs` reads them."""
    first = text_of(prompt_ids[0])
    rest, _ = completion_logprobs(entries[1:], text_of, top, len(first))
    return joined_logprobs({"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]},
                           rest)


def joined_logprobs(head: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
    """Two legacy logprobs objects as one (the echoed prompt's, then the generated tokens')."""
    return {key: head[key] + tail[key] for key in head}


def vllm_prompt_logprobs(entries: list[list[TokenLogprob] | None], text_of: TokenText) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` choice field: per prompt token {token id: {logprob, rank, decoded_token}}
    for the token and its top alternatives; None for the first token."""
    return [None if e is None else {str(lp.token_id): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                                                        "decoded_token": text_of(lp.token_id)} for lp in e}
            for e in entries]


def reported_stop_reason(stop_reason: int | str | None, params: Any) -> int | str | None:
    """`stop_reason` as vLLM reports it: the stop string or a requested stop token id; None for
    a natural end (EOS or the end-of-turn token), which the engine also records as an id."""
    if isinstance(stop_reason, int) and stop_reason not in params.stop_token_ids:
        return None
    return stop_reason


def _finite(x: float) -> float:
    return x if x > -9999.0 else -9999.0  # -inf is not JSON


class ManagedStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()


async def respond(request: Request, release: Callable[[], None], outputs: AsyncIterator[Any], stream: bool,
                  collect: Callable[[AsyncIterator[Any]], Awaitable[dict[str, Any]]],
                  to_sse: Callable[[Any, AsyncIterator[Any]], AsyncIterator[bytes]]) -> Response:
    """The response for engine `outputs`: `collect` them into a JSON body, or stream them as SSE.

    The first output is awaited before a stream starts, so a request the engine rejects still
    gets a proper HTTP status. `release` (the admission ticket) runs exactly once, at the end.
    """
    handed_off = False
    try:
        if not stream:
            return JSONResponse(await until_disconnected(request, collect(outputs)))
        first = await until_disconnected(request, outputs.__anext__())
        body = to_sse(first, outputs)

        async def close() -> None:
            await body.aclose()
            await outputs.aclose()
            release()

        handed_off = True
        return ManagedStreamingResponse(body, close)
    finally:
        if not handed_off:
            await outputs.aclose()
            release()
