"""What every route handler shares: settings, the engine client, admission control, metrics.

`RequestTracker` is the bounded queue. It counts sequences (prompts × n), not requests: an HTTP
generation request holds a ticket for its sequences from arrival until its response is fully sent;
beyond `max_num_seqs + max_queued_requests` sequences new requests get 503 with Retry-After, and one
request may not ask for more than `max_seqs_per_request` (400) — both before any template rendering
or tokenization. It also knows the engine request ids in flight, so a drain can abort them.
`engine_outputs` wraps `EngineClient.generate`: a fresh internal request id (whatever id the client
sent), metrics, abort on early close, and a final "abort" output when the engine ends a stream
without finishing it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hybridserve.config_flags import limit_or_unbounded
from hybridserve.engine.outputs import CompletionOutput, RequestOutput
from hybridserve.sampling_params import SamplingParams, SamplingParamsError
from hybridserve.serve.chat import (
    RenderedChat,
    check_prompt_chars,
    normalize_messages,
    render_chat,
    request_template,
)
from hybridserve.serve.errors import APIError, bad_request
from hybridserve.serve.logs import clip
from hybridserve.serve.metrics import Metrics

logger = logging.getLogger("hybridserve.serve")

DEFAULT_MAX_TOKENS = 8192
DEFAULT_MAX_QUEUED_REQUESTS = 2048
PROMPT_CHARS_PER_TOKEN = 16  # default --max-prompt-chars = this × max_model_len (no real text averages more)
PREPROCESS_THREADS = 4  # templating and tokenization (the HF fast tokenizer releases the GIL while it works)


@dataclass
class ServeSettings:
    """The API side's settings; `serve` makes one flag per field (hybridserve/config_flags.py)."""

    served_model_names: list[str]
    api_key: str | None = field(default=None, metadata={"env": ("HYBRIDSERVE_API_KEY", "VLLM_API_KEY"), "help": (
        "require `Authorization: Bearer KEY` on every endpoint except /health, /ping, /metrics "
        "(default: $HYBRIDSERVE_API_KEY or $VLLM_API_KEY)")})
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # output cap when a request sets no max_tokens (also capped by the context left)
    default_thinking_budget: int | None = None  # reasoning-token budget for requests that set none (default: unlimited)
    max_num_seqs: int = 256
    max_queued_requests: int | None = field(default=DEFAULT_MAX_QUEUED_REQUESTS, metadata={
        "aliases": ("--max-num-queued-reqs",), "parse": limit_or_unbounded, "help": (
            "sequences (prompts x n) allowed to wait beyond --max-num-seqs; more get 503 + Retry-After "
            "(-1: unbounded)")})
    max_seqs_per_request: int | None = field(default=None, metadata={
        "help": "most sequences (prompts × n) one request may ask for; more is a 400 (default: --max-num-seqs)"})
    max_request_body_bytes: int = field(default=64 << 20, metadata={
        "help": "largest request body accepted; a larger one is refused with 413 before it is read"})
    max_prompt_chars: int | None = field(default=None, metadata={
        "help": "longest prompt text accepted, checked before tokenizing "
                f"(default: {PROMPT_CHARS_PER_TOKEN} x max_model_len characters)"})
    trust_request_chat_template: bool = field(default=False, metadata={
        "help": "render chat templates sent in requests (chat_template, chat_template_kwargs.chat_template), "
                "in a sandboxed child process with time and memory limits; without it they are refused"})
    shutdown_timeout: float = 30.0  # on SIGTERM / Ctrl-C, seconds in-flight requests may finish before they are aborted
    enable_log_requests: bool = False  # log one line per request: id, prompt tokens, sampling parameters
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def admission_limit(self) -> int | None:
        """Sequences admitted at once (running + queued); None: unbounded."""
        return None if self.max_queued_requests is None else self.max_num_seqs + self.max_queued_requests

    @property
    def per_request_limit(self) -> int:
        cap = self.max_seqs_per_request or self.max_num_seqs
        return cap if self.admission_limit is None else min(cap, self.admission_limit)


class Ticket:
    """One admitted request and its sequences; `release()` is idempotent."""

    def __init__(self, tracker: RequestTracker, sequences: int):
        self._tracker = tracker
        self.sequences = sequences
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._tracker._release(self.sequences)


class RequestTracker:
    def __init__(self, limit: int | None, per_request: int):
        self.limit = limit
        self.per_request = per_request
        self.in_flight = 0  # requests
        self.sequences = 0  # their sequences: what the limits count
        self.rejections: Counter[str] = Counter()  # 503s at admission, by reason (vllm:admission_rejections)
        self.draining = False
        self.stopping = False  # a second signal: in-flight requests end with a 503 error now
        self.engine_request_ids: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, sequences: int = 1, param: str = "n") -> Ticket:
        if sequences > self.per_request:
            raise bad_request(f"this request asks for {sequences} sequences (prompts × n); at most "
                              f"{self.per_request} are allowed in one request", param)
        if self.draining:
            self.rejections["draining"] += 1
            raise APIError(503, "The server is shutting down and accepts no new requests.",
                           headers={"Retry-After": "5"})
        if self.limit is not None and self.sequences + sequences > self.limit:
            self.rejections["max_num_queued_reqs"] += 1
            raise APIError(503, f"The server is overloaded: {self.sequences} sequences are running or queued "
                                f"(limit {self.limit}). Retry later.", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.sequences += sequences
        self._idle.clear()
        return Ticket(self, sequences)

    def _release(self, sequences: int) -> None:
        self.in_flight -= 1
        self.sequences -= sequences
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


@dataclass
class ServerContext:
    engine: Any  # EngineClient (or a test double with the same contract)
    settings: ServeSettings
    tracker: RequestTracker
    metrics: Metrics
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        PREPROCESS_THREADS, thread_name_prefix="hybridserve-preprocess"))

    async def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking work (templating, tokenizing, big decodes) in the preprocessing threads, so the
        event loop keeps serving /health and every stream meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    @property
    def max_prompt_chars(self) -> int:
        return self.settings.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.max_model_len

    def encode(self, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
        """A prompt's token ids; text too long for the context is refused before tokenizing. Blocking."""
        check_prompt_chars(text, self.max_prompt_chars, param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def render_chat(self, req: Any, tools: list[dict[str, Any]] | None) -> RenderedChat:
        """`req` (chat or tokenize request) through the chat template and the tokenizer, off the loop."""
        kwargs = dict(req.chat_template_kwargs or {})
        template = request_template(req.chat_template, kwargs, self.settings.trust_request_chat_template)
        messages = normalize_messages(req.messages)
        return await self.offload(render_chat, self.tokenizer, messages, tools, kwargs, req.add_generation_prompt,
                                  req.continue_final_message, template=template, max_chars=self.max_prompt_chars)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 naming the first id outside the vocabulary."""
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of vocabulary (size {self.vocab_size})", param)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.served_model_names:
            raise APIError(404, f"The model `{clip(name)}` does not exist.", "model")


async def engine_outputs(ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, public_id: str,
                         arrival: float) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request, with metrics; closing it early aborts the request.

    `public_id` is what the client sees (its own `request_id` if it sent one); the engine gets a fresh
    id, so two clients' ids, or one prompt's derived id and another request's, can never collide."""
    request_id = uuid.uuid4().hex
    logger.debug("request %s runs as engine request %s", public_id, request_id)
    if ctx.settings.enable_log_requests:  # repr escapes client text; both are capped
        logger.info("request %.100r: %d prompt tokens, %.600r", public_id, len(prompt_ids), params)
    _check_not_stopping(ctx)
    gen = ctx.engine.generate(prompt_ids, params, request_id)
    ctx.tracker.engine_request_ids.add(request_id)
    ctx.metrics.observe_request(prompt_tokens=len(prompt_ids), n=params.n, max_tokens=params.max_tokens or 0)
    last: RequestOutput | None = None
    previous = arrival
    first_token: float | None = None
    queue_time: float | None = None
    try:
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except SamplingParamsError as e:
            raise bad_request(str(e), e.param) from None
        except ValueError as e:
            raise bad_request(str(e)) from None
        except Exception:
            if getattr(ctx.engine, "errored", False):
                raise APIError(503, "The engine is not running.", headers={"Retry-After": "5"}) from None
            raise
        if first is not None:
            now = first_token = time.monotonic()
            ctx.metrics.ttft.observe(now - arrival)
            queue_time = getattr(first, "queue_time", None)
            if queue_time is not None:
                ctx.metrics.queue_time.observe(queue_time)
            previous, last = now, first
            _check_not_stopping(ctx)
            yield first
            if not first.finished:
                async for out in gen:
                    now = time.monotonic()
                    ctx.metrics.itl.observe(now - previous)
                    previous, last = now, out
                    _check_not_stopping(ctx)
                    yield out
                    if out.finished:
                        break
        _check_not_stopping(ctx)
        if last is None or not last.finished:
            last = _aborted(request_id, prompt_ids, params.n, last)
            yield last
    finally:
        ctx.tracker.engine_request_ids.discard(request_id)
        await gen.aclose()
        if last is not None and last.finished:
            ctx.metrics.observe_finished(
                e2e_seconds=previous - arrival, token_counts=[len(o.token_ids) for o in last.outputs],
                finish_reasons=[o.finish_reason or "abort" for o in last.outputs],
                first_token_seconds=None if first_token is None else first_token - arrival, queue_seconds=queue_time)


def _check_not_stopping(ctx: ServerContext) -> None:
    if ctx.tracker.stopping:
        raise APIError(503, "The server is shutting down now; this request was stopped before it finished.",
                       headers={"Retry-After": "5"})


def _aborted(request_id: str, prompt_ids: list[int], n: int, last: RequestOutput | None) -> RequestOutput:
    """A final output marking every unfinished sequence as aborted (engine stream ended early)."""
    outputs = []
    for i in range(n):
        prev = last.outputs[i] if last is not None and i < len(last.outputs) else None
        outputs.append(CompletionOutput(
            index=i, text=prev.text if prev else "", token_ids=list(prev.token_ids) if prev else [],
            logprobs=prev.logprobs if prev else None,
            finish_reason=(prev.finish_reason if prev and prev.finish_reason else "abort")))
    return RequestOutput(request_id, prompt_ids, outputs, finished=True)
