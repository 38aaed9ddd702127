"""Request: one sequence the scheduler runs, from arrival to finish.

A client request with `n` choices becomes `n` Requests sharing a `request_id` (one per `index`).
The scheduler is the only writer of every field that changes: `num_computed_tokens` (tokens whose
KV and Mamba state are in the caches once the scheduled steps have run; advanced when a step is
scheduled), the status, and — through the CacheManager — the KV blocks in `block_ids` and the
Mamba `state_slot`. Invariant: `num_computed_tokens <= num_tokens`, and the gap is what the next
steps must feed the model (the rest of the prompt, or the one token sampled last step). The model
runner never sees a Request (it gets a `StepPlan`). Pure Python, no torch.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from hybridserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hybridserve.structured.matcher import SequenceMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no blocks and no slot
    WAITING_FOR_FORK = "waiting_for_fork"  # a sibling of an n > 1 request, until choice 0's prompt is done
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence: prompt, generated tokens, cache ownership, stop conditions."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        index: int = 0,
        seed: int = 0,
        max_tokens: int,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.params = params
        self.arrival = (0, index)  # (request order, choice): FCFS; set by the scheduler, kept on preemption
        self.arrival_time = time.monotonic()
        self.queue_time: float | None = None  # seconds from arrival to the first step that ran it
        self.seed = seed  # sampling key; per-token noise depends on (seed, output position) only
        self.max_tokens = max_tokens
        self.stop_token_ids = stop_token_ids  # eos (unless ignore_eos) + the request's stop ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt followed by the generated tokens known on the host
        # sampled by scheduled steps but not appended yet (async scheduling: the step is still running)
        self.num_tokens_in_flight = 0
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.block_ids: list[int] = []
        self.state_slot: int | None = None
        self.block_keys: list[int] = []  # content keys of its leading full blocks (prefix caching), memoised
        self.num_cached_tokens = 0  # prompt tokens its first admission resumed from the prefix cache
        self.snapshot_points: tuple[int, ...] = ()  # prefix caching: where its prompt's state is snapshotted (set at admission)
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.forks: list[Request] = []  # n > 1: siblings that start from this sequence's prompt state
        # the last token was sampled into this sequence's token-buffer row (its slot) on the device
        self.last_token_on_device = False
        self.thinking_open = params.thinking_budget is not None and params.thinking_end_token_id is not None
        self.grammar: SequenceMatcher | None = None  # structured outputs: set when its grammar is compiled
        # prompt_logprobs: the entries of prompt tokens 1..P-1 as the prefill scores them (entry 0 stays None)
        self.prompt_logprobs: list | None = [None] * self.num_prompt_tokens if params.prompt_logprobs is not None else None

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens, counting those still in flight (what the scheduler plans with)."""
        return len(self.token_ids) + self.num_tokens_in_flight

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens known on the host."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def next_output_index(self) -> int:
        """Output index of the next token to sample (after those in flight): the noise counter."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to feed the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def awaits_result(self) -> bool:
        """Async scheduling: nothing to schedule until the token in flight is known, because the
        last allowed token is already in flight, or the next sample's rules read the output so far
        (penalties; the thinking budget's forcing window)."""
        if not self.num_tokens_in_flight:
            return False
        p = self.params
        return (
            self.next_output_index >= self.max_tokens
            or bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)
            or (self.thinking_open and self.next_output_index >= p.thinking_budget)
        )

    # ---- decoding rules ------------------------------------------------------------------------
    @property
    def suppress_stop_tokens(self) -> bool:
        """min_tokens: stop tokens may not be sampled yet (never with a grammar: it decides where the output ends)."""
        return self.grammar is None and self.next_output_index < self.params.min_tokens

    def forced_next_token(self) -> int | None:
        """Thinking budget: the token to force as the next output, or None (see SamplingParams).
        Inside the forcing window it reads the last token, so it needs no token in flight."""
        p = self.params
        if not self.thinking_open:
            return None
        i = self.next_output_index  # index of the token about to be generated
        if i < p.thinking_budget:
            return None
        if i >= p.thinking_budget + p.thinking_grace_tokens:
            return p.thinking_end_token_id
        newline_in_grace = i - 1 >= p.thinking_budget and self.token_ids[-1] in p.newline_token_ids
        return p.thinking_end_token_id if newline_in_grace else None

    def append_token(self, token_id: int) -> bool:
        """Add a sampled token; returns True when it ends the sequence (finish_reason set)."""
        self.token_ids.append(token_id)
        p = self.params
        if self.thinking_open and (token_id == p.thinking_end_token_id or token_id in p.thinking_implicit_end_token_ids):
            self.thinking_open = False
        if token_id in self.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token_id
        elif self.grammar is not None and self.grammar.accept(token_id):  # complete (or broken)
            self.finish_reason = "abort" if self.grammar.failed else "stop"
        elif self.num_output_tokens >= self.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, slot={self.state_slot})"
        )
