"""What every route handler shares: settings, the engine client, admission control, metrics.

`RequestTracker` is the bounded queue: an HTTP generation request holds one admission ticket from
arrival until its response is fully sent; beyond `max_num_seqs + max_queued_requests` tickets new
requests get 503 with Retry-After, before any template rendering or tokenization. It also knows
the engine request ids in flight, so a drain can abort them. `engine_outputs` wraps
`EngineClient.generate`: metrics, abort on early close, and a final "abort" output when the engine
ends a stream without finishing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hybridserve.config_flags import limit_or_unbounded
from hybridserve.engine.outputs import CompletionOutput, RequestOutput
from hybridserve.sampling_params import SamplingParams, SamplingParamsError
from hybridserve.serve.errors import APIError, bad_request
from hybridserve.serve.metrics import Metrics

logger = logging.getLogger("hybridserve.serve")

DEFAULT_MAX_TOKENS = 8192
DEFAULT_MAX_QUEUED_REQUESTS = 2048


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
            "requests allowed to wait beyond --max-num-seqs; more get 503 + Retry-After (-1: unbounded)")})
    shutdown_timeout: float = 30.0  # on SIGTERM / Ctrl-C, seconds in-flight requests may finish before they are aborted
    enable_log_requests: bool = False  # log one line per request: id, prompt tokens, sampling parameters
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


class Ticket:
    """One admitted request; `release()` is idempotent."""

    def __init__(self, tracker: RequestTracker):
        self._tracker = tracker
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._tracker._release()


class RequestTracker:
    def __init__(self, limit: int | None):
        self.limit = limit
        self.in_flight = 0
        self.rejections: Counter[str] = Counter()  # 503s at admission, by reason (vllm:admission_rejections)
        self.draining = False
        self.engine_request_ids: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self) -> Ticket:
        if self.draining:
            self.rejections["draining"] += 1
            raise APIError(503, "The server is shutting down and accepts no new requests.",
                           headers={"Retry-After": "5"})
        if self.limit is not None and self.in_flight >= self.limit:
            self.rejections["max_num_queued_reqs"] += 1
            raise APIError(503, f"The server is overloaded: {self.in_flight} requests are running or queued "
                                f"(limit {self.limit}). Retry later.", headers={"Retry-After": "1"})
        self.in_flight += 1
        self._idle.clear()
        return Ticket(self)

    def _release(self) -> None:
        self.in_flight -= 1
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
            raise APIError(404, f"The model `{name}` does not exist.", "model")


async def engine_outputs(ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, request_id: str,
                         arrival: float) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request, with metrics; closing it early aborts the request."""
    if ctx.settings.enable_log_requests:  # repr escapes client text; both are capped
        logger.info("request %.100r: %d prompt tokens, %.600r", request_id, len(prompt_ids), params)
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
                raise APIError(503, "The engine is not running.") from None
            raise
        if first is not None:
            now = first_token = time.monotonic()
            ctx.metrics.ttft.observe(now - arrival)
            queue_time = getattr(first, "queue_time", None)
            if queue_time is not None:
                ctx.metrics.queue_time.observe(queue_time)
            previous, last = now, first
            yield first
            if not first.finished:
                async for out in gen:
                    now = time.monotonic()
                    ctx.metrics.itl.observe(now - previous)
                    previous, last = now, out
                    yield out
                    if out.finished:
                        break
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
