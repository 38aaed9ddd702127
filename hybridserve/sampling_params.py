"""SamplingParams: how one request is decoded.

Built by the API edge (HTTP server, `LLM.generate`) and carried unchanged into the engine.
Validation happens here, in `__post_init__` (ranges that need no model) and `validate_vocab`
(token ids and top_k against the vocabulary), so a bad value is a clear `ValueError` naming the
parameter before the request ever reaches the engine. Every integer is bounded so that it fits
the int64 tensors and the msgpack messages it travels in: no client value overflows downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridserve.structured.spec import StructuredSpec

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_INT64 = 2**63 - 1
SEED_RANGE = (-(2**63), 2**64)  # any 64-bit seed, signed or unsigned; the engine keeps its low 63 bits


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    max_tokens: int | None = 16  # None: up to the model's context limit
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs to return besides the sampled token
    # per prompt token: its logprob given the tokens before it, and this many top alternatives
    # (vLLM's prompt_logprobs; the first prompt token has no entry)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Thinking budget: after `thinking_budget` generated tokens with reasoning still open (no
    # `thinking_end_token_id` generated yet), the engine forces `thinking_end_token_id`, at the first
    # token in `newline_token_ids` within `thinking_grace_tokens` more tokens, else right at the end
    # of the grace window. Generating one of `thinking_implicit_end_token_ids` (`<tool_call>`) also
    # closes reasoning, so nothing is forced into the middle of a tool call.
    thinking_budget: int | None = None
    thinking_end_token_id: int | None = None
    thinking_implicit_end_token_ids: list[int] = field(default_factory=list)
    thinking_grace_tokens: int = 0
    newline_token_ids: list[int] = field(default_factory=list)
    # Structured outputs: the grammar the output must follow (built and checked by
    # `hybridserve.structured.grammars`); the sequence ends when the grammar is complete.
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}]")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= MAX_INT64, "top_k",
               "must be -1, 0 (disabled) or a positive integer")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]), "seed",
               "must be an integer in [-2^63, 2^64)")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        _check(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()), "logit_bias",
               "values must be in [-100, 100]")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_INT64),
               "max_tokens", "must be a positive integer")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= MAX_INT64, "min_tokens", "must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               "must not exceed max_tokens")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        _check(self.prompt_logprobs is None
               or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        _check(self.thinking_budget is None or (_is_int(self.thinking_budget) and 0 <= self.thinking_budget <= MAX_INT64),
               "thinking_token_budget", "must be a non-negative integer")
        _check(_is_int(self.thinking_grace_tokens) and 0 <= self.thinking_grace_tokens <= MAX_INT64,
               "thinking_grace_tokens", "must be >= 0")
        for name in ("stop_token_ids", "newline_token_ids", "thinking_implicit_end_token_ids"):
            _check(all(_is_int(t) and abs(t) <= MAX_INT64 for t in getattr(self, name)), name, "must be token ids")
        _check(self.thinking_end_token_id is None or _is_int(self.thinking_end_token_id), "thinking_end_token_id",
               "must be a token id")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the vocabulary, and top_k may not exceed it."""
        for tid in list(self.logit_bias) + self.stop_token_ids:
            _check(0 <= tid < vocab_size, "logit_bias" if tid in self.logit_bias else "stop_token_ids",
                   f"token id {_short(tid)} is outside the vocabulary [0, {vocab_size})")
        _check(self.top_k <= vocab_size, "top_k", f"must be -1, 0 (disabled) or in [1, {vocab_size}] (the vocabulary)")


class SamplingParamsError(ValueError):
    """A request parameter is invalid; `param` names it (for the OpenAI error envelope)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: int) -> str:
    """An integer for an error message: huge client values are cut, not echoed in full."""
    text = str(x)
    return text if len(text) <= 24 else f"{text[:20]}...({len(text)} digits)"


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(param, message)
