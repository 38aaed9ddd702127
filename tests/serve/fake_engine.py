"""A deterministic stand-in for EngineClient (docs/contracts.md), for HTTP tests that need control.

Replies are scripted text (`reply(prompt_text, params) -> str`), emitted one token per step, with
max_tokens, stop strings, EOS (`<|im_end|>`), logprobs, n and aborts behaving as the contract says.
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

from hybridserve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from hybridserve.sampling_params import SamplingParamsError
from hybridserve.serve.reasoning import held_back_suffix

DEFAULT_REPLY = "Let me think.\n</think>\nHello there! The answer is 42.<|im_end|>"


class FakeEngineClient:
    def __init__(self, tokenizer, max_model_len: int = 2048, step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_config = SimpleNamespace(vocab_size=len(tokenizer), path=None)
        self.is_ready = True
        self.errored = False
        self.step_delay = step_delay
        self.reply = lambda prompt, params: DEFAULT_REPLY
        self.fail_after: int | None = None  # raise inside the stream after this many steps
        self.active: dict[str, bool] = {}  # request id -> abort requested
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.last_params = None
        self.last_prompt_ids = None
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.shutdown_called = False

    def stats(self):
        n = len(self.active)
        return SimpleNamespace(num_running=n, num_waiting=0, kv_cache_usage=n / 64, state_slot_usage=n / 16,
                               num_preemptions_total=0, prompt_tokens_total=0, generation_tokens_total=0,
                               num_free_blocks=64 - n, num_free_slots=16 - n, num_blocks=64, num_slots=16)

    async def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.active[request_id] = True

    async def shutdown(self) -> None:
        self.shutdown_called = True

    async def generate(self, prompt_token_ids, params, request_id):
        if len(prompt_token_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise SamplingParamsError("max_tokens", "does not fit the context")
        self.last_params, self.last_prompt_ids = params, list(prompt_token_ids)
        prompt = self.tokenizer.decode(prompt_token_ids)
        seqs = []
        for i in range(params.n):
            text = self.reply(prompt, params)
            if params.seed is not None and params.temperature > 0:
                text = f"[seed {params.seed} #{i}] " + text
            seqs.append(self.tokenizer.encode(text, add_special_tokens=False))
        outs = [CompletionOutput(index=i) for i in range(params.n)]
        self.active[request_id] = False
        step = 0
        try:
            while True:
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                else:
                    await asyncio.sleep(0)
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("simulated engine failure")
                step += 1
                aborting = self.active[request_id]
                for i, o in enumerate(outs):
                    o.text_delta, o.token_ids_delta, o.logprobs_delta = "", [], None
                    if o.finish_reason is not None:
                        continue
                    if aborting:
                        o.finish_reason = "abort"
                        continue
                    tok = seqs[i][len(o.token_ids)] if len(o.token_ids) < len(seqs[i]) else self.eos_id
                    before = o.text
                    o.token_ids.append(tok)
                    o.token_ids_delta = [tok]
                    if params.logprobs is not None:
                        lp = [TokenLogprob(tok, -0.5, 1)] + [
                            TokenLogprob((tok + k) % 200 + 16, -1.0 - k, k + 1) for k in range(1, params.logprobs + 1)]
                        o.logprobs = (o.logprobs or []) + [lp]
                        o.logprobs_delta = [lp]
                    if tok == self.eos_id and not params.ignore_eos:
                        o.finish_reason = "stop"
                        o.stop_reason = None
                        continue
                    full = self.tokenizer.decode(o.token_ids, skip_special_tokens=params.skip_special_tokens)
                    hit = next((s for s in params.stop if s in full), None)
                    if hit is not None:
                        o.text = full[: full.index(hit)]
                        o.finish_reason, o.stop_reason = "stop", hit
                    elif len(o.token_ids) >= (params.max_tokens or math.inf):
                        o.text, o.finish_reason = full, "length"
                    else:  # hold back text that may be the start of a stop string
                        o.text = full[: len(full) - held_back_suffix(full, tuple(params.stop))]
                    o.text_delta = o.text[len(before):]
                done = all(o.finish_reason is not None for o in outs)
                yield RequestOutput(request_id, list(prompt_token_ids),
                                    [CompletionOutput(**{**vars(o), "token_ids": list(o.token_ids)}) for o in outs], finished=done)
                if done:
                    self.finished.append(request_id)
                    return
        finally:
            if request_id not in self.finished:
                self.aborted.append(request_id)
            self.active.pop(request_id, None)
