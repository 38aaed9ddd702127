"""OutputProcessor: token-level EngineOutputs -> text-level RequestOutputs, on the API side.

Per choice: incremental detokenization, stop strings (searched in the new text plus the tail that
could start a match, trimmed from the output unless `include_stop_str_in_output`; while a stop
string could still be forming, the last len(stop)-1 characters are held back from the stream), and
the n choices gathered into one RequestOutput with cumulative and delta fields. A stop string ends
a choice here; `process` returns the choices the engine must abort. Used by EngineClient and LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.outputs import CompletionOutput, EngineOutput, RequestOutput
from hybridserve.sampling_params import SamplingParams


@dataclass
class _Choice:
    """One choice's running state; `snapshot` turns it into an immutable-by-convention output."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    want_logprobs: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""  # everything detokenized so far
    released: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # this step
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list = field(default_factory=list)
    text_delta: str = ""

    def snapshot(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text[: self.released],
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if self.want_logprobs else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            text_delta=self.text_delta,
            token_ids_delta=self.new_token_ids,
            logprobs_delta=self.new_logprobs if self.want_logprobs else None,
        )


@dataclass
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    choices: list[_Choice] = field(default_factory=list)
    hold_back: int = 0  # characters held back while a stop string may be forming
    prompt_logprobs: list | None = None  # arrives once, with the first tokens


class OutputProcessor:
    """Tracks the live requests of one engine; `tokenizer` None returns token ids only."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        state = _RequestState(request_id, prompt_token_ids, prompt, params)
        if params.stop and not params.include_stop_str_in_output:
            state.hold_back = max(len(s) for s in params.stop) - 1
        for i in range(params.n):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            state.choices.append(_Choice(i, detok, params.logprobs is not None))
        self.requests[request_id] = state

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, engine_output: EngineOutput) -> tuple[RequestOutput | None, list[int]]:
        """Apply one step's output. Returns (the RequestOutput to deliver, or None for an unknown
        or already finished request; the choice indices a stop string just ended)."""
        state = self.requests.get(engine_output.request_id)
        if state is None:
            return None, []
        for choice in state.choices:
            choice.new_token_ids, choice.new_logprobs, choice.text_delta = [], [], ""
        if engine_output.prompt_logprobs is not None:
            state.prompt_logprobs = engine_output.prompt_logprobs
        stopped = []
        for delta in engine_output.deltas:
            choice = state.choices[delta.index]
            if choice.finish_reason is not None:
                continue  # already ended by a stop string; the engine's abort is on its way
            if self._apply(state, choice, delta):
                stopped.append(delta.index)
        if engine_output.error is not None:
            for choice in state.choices:
                choice.finish_reason = choice.finish_reason or "error"
        finished = all(c.finish_reason is not None for c in state.choices)
        if finished:
            self.remove(state.request_id)
        result = RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[c.snapshot() for c in state.choices],
            finished=finished,
            prompt=state.prompt,
            error=engine_output.error,
            num_preemptions=engine_output.num_preemptions,
            queue_time=engine_output.queue_time,
            num_cached_tokens=engine_output.num_cached_tokens,
            prompt_logprobs=state.prompt_logprobs,
        )
        return result, stopped

    def _apply(self, state: _RequestState, choice: _Choice, delta) -> bool:
        """Add one choice's new tokens; returns True when a stop string ended it."""
        params = state.params
        choice.token_ids += delta.token_ids
        choice.new_token_ids += delta.token_ids
        if delta.logprobs is not None and choice.want_logprobs:
            choice.logprobs += delta.logprobs
            choice.new_logprobs += delta.logprobs
        stop_string = None
        if choice.detokenizer is not None:
            ids = delta.token_ids
            if delta.finish_reason == "stop" and isinstance(delta.stop_reason, int) and not params.include_stop_str_in_output:
                ids = ids[:-1]  # the stop token's own text is not part of the answer
            start = max(0, len(choice.text) - max((len(s) for s in params.stop), default=0) + 1)
            if ids:
                choice.text += choice.detokenizer.add(ids)
            if delta.finish_reason is not None:
                choice.text += choice.detokenizer.flush()
            if len(choice.token_ids) >= params.min_tokens:  # before min_tokens, stop strings do not stop (vLLM)
                stop_string, cut = _find_stop(choice.text, params.stop, start, params.include_stop_str_in_output)
            if stop_string is not None:
                choice.text = choice.text[:cut]
        if stop_string is not None:
            choice.finish_reason, choice.stop_reason = "stop", stop_string
        elif delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        done = choice.finish_reason is not None
        release = len(choice.text) if done else max(choice.released, len(choice.text) - state.hold_back)
        choice.text_delta += choice.text[choice.released : release]
        choice.released = release
        return stop_string is not None


def _find_stop(text: str, stops: list[str], start: int, include: bool) -> tuple[str | None, int]:
    """The earliest stop string found at or after `start`, and where the text is cut."""
    best, best_at = None, len(text) + 1
    for s in stops:
        at = text.find(s, start)
        if at != -1 and at < best_at:
            best, best_at = s, at
    if best is None:
        return None, len(text)
    return best, best_at + (len(best) if include else 0)
