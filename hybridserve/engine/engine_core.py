"""EngineCore: the engine loop — take requests, schedule, run the model, sample, emit token outputs.

Used in-process (`LLM`, tests: call `add_request` / `abort` / `step`) or as its own process
(`run_engine_core_process`, started by `EngineClient`): a busy loop that drains the input socket
without blocking while there is work, sends each step's outputs at once, and only sleeps on the
socket when idle. It never waits on the API process (the output socket has no send limit).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
import traceback

import msgspec
import zmq

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.messages import (
    AbortRequest,
    AddRequest,
    EngineInput,
    EngineReady,
    EngineStep,
    Shutdown,
)
from hybridserve.engine.model_runner import ModelRunner
from hybridserve.engine.outputs import EngineOutput, SequenceDelta
from hybridserve.engine.request import Request, RequestStatus
from hybridserve.engine.sampler import SamplerOutput
from hybridserve.engine.scheduler import ScheduledStep, Scheduler
from hybridserve.engine.stats import EngineStats, IterationTokens
from hybridserve.sampling_params import SamplingParams
from hybridserve.structured.bitmask import fill_bitmasks
from hybridserve.structured.compiler import GrammarCompiler
from hybridserve.structured.pending import PendingGrammars

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 63) - 1


class EngineCore:
    """Scheduler + ModelRunner; one `step()` is one model forward."""

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig | None = None,
        *,
        extra_stop_token_ids: tuple[int, ...] = (),
        model=None,
    ) -> None:
        """extra_stop_token_ids: end-of-turn ids besides the model's eos (the tokenizer's
        `<|im_end|>`), stopped on unless `ignore_eos`. model: an already built model (tests)."""
        self.config = config
        self.model_config = model_config or ModelConfig.from_hf(config.model)
        self.runner = ModelRunner(config, self.model_config, model=model)
        self.layout = self.runner.layout
        self.scheduler = Scheduler(
            layout=self.layout,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding,
        )
        self.eos_token_ids = frozenset(self.model_config.eos_token_id) | frozenset(extra_stop_token_ids)
        self._in_flight: tuple[ScheduledStep, SamplerOutput | None] | None = None  # async: launched, not applied
        self._seeds = random.Random(config.seed)  # seeds of requests that bring none
        # structured requests wait here for their grammar (compiled on a worker thread), then queue
        self.grammars = PendingGrammars(GrammarCompiler(
            config.tokenizer or config.model, self.model_config.vocab_size, self.eos_token_ids))
        self.iteration_tokens = IterationTokens()

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise ValueError (SamplingParamsError) if the request is invalid or can never fit; else
        return its max_tokens. Changes nothing, so a batch can be checked before any of it is queued."""
        vocab = self.model_config.vocab_size
        params.validate_vocab(vocab)
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return self.layout.check_request(len(prompt_token_ids), params.max_tokens)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError (SamplingParamsError) if it is invalid or can never fit."""
        max_tokens = self.check_request(prompt_token_ids, params)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seed = (params.seed if params.seed is not None else self._seeds.getrandbits(63)) & _SEED_MASK
        sequences = [
            Request(
                request_id, prompt_token_ids, params, index=i, seed=choice_seed(seed, i),
                max_tokens=max_tokens, stop_token_ids=stop_ids,
            )
            for i in range(params.n)
        ]
        if params.structured is None:
            self.scheduler.add(sequences)
        elif request_id in self.grammars or request_id in self.scheduler.groups:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        else:
            self.grammars.add(sequences)

    def abort(self, request_id: str, indices: list[int] | None = None) -> EngineOutput | None:
        """Finish a request (or some of its choices) now; the output says so, or None if unknown."""
        dropped = self.grammars.abort(request_id, indices)
        if dropped is None:
            return self.scheduler.abort(request_id, indices)
        deltas = [SequenceDelta(index=s.index, token_ids=[], finish_reason="abort") for s in dropped]
        return EngineOutput(request_id, deltas, finished=request_id not in self.grammars)

    def step(self) -> list[EngineOutput]:
        """One model step: schedule it and launch its forward; then fill its grammar masks on the
        CPU and launch its sampling (the masks need every earlier token applied), and apply its
        tokens. With `async_scheduling` the previous step's tokens are waited for and applied
        while this forward runs, right before this step's sampling, and this step's tokens are
        applied by the next call: the device never waits for the host between steps, and decode
        rows read the previous step's tokens from the device token buffer."""
        outputs = self._queue_compiled()
        step = self.scheduler.schedule()
        if not step and self._in_flight is None:
            if self.grammars:  # only grammars compiling: wait for one rather than spin
                self.grammars.wait(0.01)
            return outputs
        logits = self.runner.forward(step.plan) if step else None
        if step:
            self.iteration_tokens.observe(len(step.plan.input_ids))  # tokens fed this step, prompt and decode
        if self.config.async_scheduling:
            previous, self._in_flight = self._in_flight, None
            outputs += self._apply(previous)
        launched = self._sample(step, logits) if step else None
        if not self.config.async_scheduling:
            return outputs + self._apply(launched)
        self._in_flight = launched
        return outputs

    def _queue_compiled(self) -> list[EngineOutput]:
        """Queue the structured requests whose grammar is ready; fail those whose grammar failed."""
        ready, failed = self.grammars.take_ready()
        for sequences in ready:
            self.scheduler.add(sequences)
        return [EngineOutput(request_id, [], finished=True, error=error) for request_id, error in failed]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.grammars) or self._in_flight is not None

    def _sample(self, step: ScheduledStep, logits) -> tuple[ScheduledStep, SamplerOutput] | None:
        """Fill the step's grammar masks (rows of sequences that ended or were preempted meanwhile
        get none: they are dropped), queue its sampling (and prompt-logprob scoring) and start the
        copy of its results."""
        if not step.plan.num_logits_rows:
            return None
        matchers = [r.grammar if r.status is RequestStatus.RUNNING and r.num_preemptions == epoch else None
                    for r, epoch in zip(step.sample_requests, step.sample_epochs)]
        bitmasks = fill_bitmasks(matchers, self.runner.device)
        if bitmasks is not None:
            bitmasks.defer_forbidden(step.plan.sampling.forced)
        return step, self.runner.sample(step.plan, logits, bitmasks)

    def _apply(self, launched: tuple[ScheduledStep, SamplerOutput] | None) -> list[EngineOutput]:
        """Wait for a launched step's tokens and hand them to the scheduler."""
        if launched is None:
            return []
        step, sampled = launched
        token_ids, logprobs = sampled.to_host()
        return self.scheduler.update(step, token_ids, logprobs, sampled.prompt_entries)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=s.num_waiting + self.grammars.num_sequences,
            kv_cache_usage=s.cache.block_usage,
            state_slot_usage=s.cache.slot_usage,
            num_preemptions_total=s.num_preemptions_total,
            prompt_tokens_total=s.prompt_tokens_total,
            generation_tokens_total=s.generation_tokens_total,
            num_free_blocks=s.cache.block_pool.num_free,
            num_free_slots=s.cache.slot_pool.num_free,
            num_blocks=self.layout.num_blocks,
            num_slots=self.layout.num_slots,
            iteration_tokens_counts=list(self.iteration_tokens.counts),
            iteration_tokens_sum=self.iteration_tokens.sum,
            prefix_cache_queries_total=s.cache.queries_total,
            prefix_cache_hits_total=s.cache.hits_total,
            num_snapshots=s.cache.num_snapshots,
        )


def choice_seed(seed: int, index: int) -> int:
    """Distinct sampling keys for the n choices of one request."""
    return seed if index == 0 else (seed + index * 0x9E3779B97F4A7C15) & _SEED_MASK


class _ThroughputLog:
    """One INFO line every `interval` seconds while the engine works: queues, cache use, tok/s."""

    def __init__(self, core: EngineCore, interval: float = 10.0) -> None:
        self.core, self.interval = core, interval
        self.last = time.monotonic()
        self.prompt = self.generated = self.queries = self.hits = 0

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        st = self.core.stats()
        dt, self.last = now - self.last, now
        prompt, generated = st.prompt_tokens_total - self.prompt, st.generation_tokens_total - self.generated
        self.prompt, self.generated = st.prompt_tokens_total, st.generation_tokens_total
        queries, hits = st.prefix_cache_queries_total - self.queries, st.prefix_cache_hits_total - self.hits
        self.queries, self.hits = st.prefix_cache_queries_total, st.prefix_cache_hits_total
        if prompt or generated or st.num_running or st.num_waiting:
            logger.info(
                "running %d, waiting %d, KV %.0f%%, slots %.0f%%, prompt %.1f tok/s, generation %.1f tok/s, "
                "preemptions %d, prefix cache hit rate %.1f%% (%d snapshots)", st.num_running, st.num_waiting,
                100 * st.kv_cache_usage, 100 * st.state_slot_usage, prompt / dt, generated / dt,
                st.num_preemptions_total, 100 * hits / queries if queries else 0.0, st.num_snapshots,
            )


def run_engine_core_process(
    config: EngineConfig,
    input_address: str,
    output_address: str,
    extra_stop_token_ids: tuple[int, ...],
    parent_pid: int | None = None,
) -> None:
    """Entry point of the engine-core process (or thread, in-process mode): serve until Shutdown.

    Exits by itself when the parent process is gone (parent_pid set), so no orphan survives.
    """
    if parent_pid is not None:  # a process of its own: it owns its logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
        # Ctrl-C reaches the whole process group; the API process drains and then stops us with Shutdown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never block on a slow reader
    outputs.setsockopt(zmq.LINGER, 2000)
    outputs.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(EngineInput)
    try:
        core = EngineCore(config, extra_stop_token_ids=extra_stop_token_ids)
    except Exception:
        outputs.send(encoder.encode(EngineReady(error=traceback.format_exc())))
        outputs.close()
        inputs.close(linger=0)
        ctx.term()
        return
    outputs.send(encoder.encode(EngineReady(core.layout)))

    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    log = _ThroughputLog(core)
    running = True
    try:
        while running:
            timeout = 0 if core.has_unfinished() else 1000
            step_outputs: list[EngineOutput] = []
            while poller.poll(timeout):
                timeout = 0
                msg = decoder.decode(inputs.recv())
                if isinstance(msg, AddRequest):
                    try:
                        core.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
                    except ValueError as e:
                        step_outputs.append(EngineOutput(msg.request_id, [], finished=True, error=str(e)))
                elif isinstance(msg, AbortRequest):
                    out = core.abort(msg.request_id, msg.indices)
                    if out is not None:
                        step_outputs.append(out)
                elif isinstance(msg, Shutdown):
                    running = False
                    break
            if not running:
                break
            if core.has_unfinished():
                step_outputs += core.step()
            if step_outputs:
                outputs.send(encoder.encode(EngineStep(step_outputs, core.stats())))
            log.maybe_log()
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("the API process is gone; engine core exits")
                break
    except Exception:
        logger.exception("engine core failed; exiting (the client reports the engine dead)")
        raise
    finally:
        inputs.close(linger=0)
        outputs.close()
        ctx.term()
