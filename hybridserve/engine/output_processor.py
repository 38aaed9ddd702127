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
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # everything detokenized so far (output.text is the part released)


@dataclass
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    choices: list[_Choice] = field(default_factory=list)
    hold_back: int = 0  # characters held back while a stop string may be forming


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
            logprobs = [] if params.logprobs is not None else None
            state.choices.append(_Choice(CompletionOutput(index=i, logprobs=logprobs), detok))
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
            out = choice.output
            out.text_delta, out.token_ids_delta = "", []
            out.logprobs_delta = [] if out.logprobs is not None else None
        stopped = []
        for delta in engine_output.deltas:
            choice = state.choices[delta.index]
            if choice.output.finished:
                continue  # already ended by a stop string; the engine's abort is on its way
            if self._apply(state, choice, delta):
                stopped.append(delta.index)
        if engine_output.error is not None:
            for choice in state.choices:
                if not choice.output.finished:
                    choice.output.finish_reason = "error"
        finished = all(c.output.finished for c in state.choices)
        if finished:
            self.remove(state.request_id)
        result = RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[c.output for c in state.choices],
            finished=finished,
            prompt=state.prompt,
            error=engine_output.error,
            num_preemptions=engine_output.num_preemptions,
        )
        return result, stopped

    def _apply(self, state: _RequestState, choice: _Choice, delta) -> bool:
        """Add one choice's new tokens; returns True when a stop string ended it."""
        out, params = choice.output, state.params
        out.token_ids += delta.token_ids
        out.token_ids_delta += delta.token_ids
        if delta.logprobs is not None and out.logprobs is not None:
            out.logprobs += delta.logprobs
            out.logprobs_delta += delta.logprobs
        stop_string = None
        if choice.detokenizer is not None:
            ids = delta.token_ids
            if delta.finish_reason == "stop" and isinstance(delta.stop_reason, int) and not params.include_stop_str_in_output:
                ids = ids[:-1]  # the stop token's own text is not part of the answer
            start = max(0, len(choice.text) - max((len(s) for s in params.stop), default=0) + 1)
            choice.text += choice.detokenizer.add(ids) if ids else ""
            stop_string, cut = _find_stop(choice.text, params.stop, start, params.include_stop_str_in_output)
            if stop_string is not None:
                choice.text = choice.text[:cut]
        if stop_string is not None:
            out.finish_reason, out.stop_reason = "stop", stop_string
        elif delta.finish_reason is not None:
            out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
        release = len(choice.text) if out.finished else max(len(out.text), len(choice.text) - state.hold_back)
        out.text_delta += choice.text[len(out.text) : release]
        out.text = choice.text[:release]
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
