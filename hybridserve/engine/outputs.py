"""What the engine hands back, at two levels.

`EngineOutput` is token-level: one per request per engine step, sent from the engine core to the
API side (over ZMQ as msgspec, or in-process). `RequestOutput` is text-level: produced on the API
side by the output processor (incremental detokenization, stop strings, n > 1 bookkeeping) and
consumed by the HTTP server and `LLM.generate`. Each `CompletionOutput` carries both the cumulative
result and the delta of the latest step, so streaming and non-streaming callers read the same type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    rank: int  # 1-based rank of token_id in the full distribution


class SequenceDelta(msgspec.Struct, array_like=True):
    index: int  # choice index in [0, n)
    token_ids: list[int]
    # per new token: the sampled token first, then the top-`logprobs` alternatives
    logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


class EngineOutput(msgspec.Struct, array_like=True):
    request_id: str
    deltas: list[SequenceDelta]
    finished: bool  # every sequence of the request has finished
    num_preemptions: int = 0
    queue_time: float | None = None  # seconds the request waited before its first step
    num_cached_tokens: int = 0  # prompt tokens resumed from the prefix cache (choice 0's first admission)
    error: str | None = None  # set when the engine failed this request
    # prompt_logprobs, once per request (with its first tokens): per prompt token, its entry then
    # the top alternatives; the first prompt token has None
    prompt_logprobs: list[list[TokenLogprob] | None] | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # the latest step only (what a streaming response sends)
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[list[TokenLogprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    queue_time: float | None = None  # seconds the request waited in the engine before its first step
    num_cached_tokens: int = 0  # prompt tokens the engine resumed from the prefix cache instead of computing
    # prompt_logprobs (SamplingParams.prompt_logprobs): per prompt token, its entry then the top
    # alternatives, the first token None; set from the output with the first tokens on
    prompt_logprobs: list[list[TokenLogprob] | None] | None = None
