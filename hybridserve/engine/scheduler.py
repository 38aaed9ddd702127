"""Scheduler: which requests run in the next model step, and how many tokens each feeds.

There are no prefill and decode phases: every running request wants `num_pending_tokens` more
tokens (the rest of its prompt, or the token sampled last step) and gets as many as the step's
token budget allows; while any sequence decodes, prompt tokens get at most
`max_prefill_tokens_while_decoding` of it (a long prefill chunk would stretch every decode's
inter-token latency), and prompt_logprobs prefills at most `PROMPT_LOGPROB_ROWS_PER_STEP`. Order
within a step: running decodes, then running prompt chunks, then waiting requests admitted first
come, first served while a state slot, KV blocks for their first chunk, a `max_num_seqs` place
and budget remain. When a running request needs a KV block and none
is free, the newest running request is preempted (blocks and slot freed, requeued, recomputed).

The scheduler is the only writer of `Request`: `schedule()` advances `num_computed_tokens` of what
it schedules and returns a `ScheduledStep` whose `plan` (plain numpy, `step_plan.py`) is all the
model runner sees; `update()` applies the sampled tokens. Cache ownership goes through the
`CacheManager`.

n > 1: choice 0 prefills the prompt once. The step that completes the prompt forks the other
choices right when it is scheduled, before anything can free the parent: each sibling shares the
parent's full prompt blocks, gets its own copy of the tail block and of the Mamba slot (copied by
the runner after that step's forward) and samples its first token from the parent's logits row.
From then on the choices are independent sequences: no choice's end touches a sibling's state.
A sibling with no room (slot, block, `max_num_seqs`) is queued and prefills its prompt itself.
Pure Python, no torch. Invariants: `check_invariants`.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from hybridserve.engine.cache_manager import CacheLayout, CacheManager, StepChanges
from hybridserve.engine.outputs import EngineOutput, SequenceDelta, TokenLogprob
from hybridserve.engine.request import Request, RequestStatus
from hybridserve.engine.step_plan import FROM_DEVICE, PROMPT_LOGPROB_ROWS_PER_STEP, SamplingInputs, StepPlan


@dataclass
class ScheduledStep:
    """One step: the plan for the runner, and the scheduler's own record of whom it concerns."""

    plan: StepPlan
    requests: list[Request]  # [B] the sequences fed, in batch order (decodes first)
    sample_requests: list[Request]  # [R] the sequence each sample row belongs to
    sample_epochs: list[int]  # [R] its preemption count then: a row of a since-preempted sequence is dropped
    # prompt_logprobs: (sequence, first prompt position scored, count) per run of the plan's L prompt rows
    prompt_logprob_runs: list[tuple[Request, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    """Token-budget continuous batching over the CacheManager's block and slot pools."""

    def __init__(self, *, layout: CacheLayout, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens_while_decoding: int | None = None) -> None:
        self.layout = layout
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding or max_num_batched_tokens
        self.cache = CacheManager(layout)
        self.waiting: list[Request] = []  # sorted by arrival (FCFS; preempted ones keep their place)
        self.running: list[Request] = []  # sorted by arrival; the last is the newest
        self.groups: dict[str, list[Request]] = {}  # request_id -> its n sequences
        self.num_preemptions_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._next_arrival = 0
        self._prompt_logprobs_due: set[str] = set()  # requests whose prompt logprobs are not sent yet

    # ---- admission -----------------------------------------------------------------------------
    def add(self, sequences: list[Request]) -> None:
        """Queue the n sequences of one request (index 0 first)."""
        first = sequences[0]
        self.layout.check_request(first.num_prompt_tokens, first.max_tokens)
        if first.request_id in self.groups:
            raise ValueError(f"request id {first.request_id!r} is already in the engine")
        arrival = self._next_arrival
        self._next_arrival += 1
        for seq in sequences:
            seq.arrival = (arrival, seq.index)
        self.groups[first.request_id] = sequences
        if first.prompt_logprobs is not None:
            self._prompt_logprobs_due.add(first.request_id)
        first.forks = sequences[1:]
        for sib in first.forks:
            sib.status = RequestStatus.WAITING_FOR_FORK
        bisect.insort(self.waiting, first, key=_arrival)

    def abort(self, request_id: str, indices: list[int] | None = None) -> EngineOutput | None:
        """Finish the given choices (all by default) with reason "abort"; frees their cache."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        deltas = []
        for seq in group:
            if seq.is_finished or (indices is not None and seq.index not in indices):
                continue
            if seq.status is RequestStatus.WAITING_FOR_FORK:
                group[0].forks.remove(seq)
            else:
                self._remove(seq)
            self._release_forks(seq)  # choice 0 aborted before its prompt was done: siblings prefill themselves
            self._finish(seq, "abort")
            deltas.append(SequenceDelta(index=seq.index, token_ids=[], finish_reason="abort"))
        return self._output(group, deltas) if deltas else None

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        scheduled: dict[Request, int] = {}  # in batch order
        forked: dict[Request, list[Request]] = {}  # parent -> siblings forked this step
        decodes, prompts = [], []
        for r in self.running:
            (decodes if r.num_pending_tokens == 1 else prompts).append(r)
        left = _StepBudget(self.max_num_batched_tokens,
                           self.max_prefill_tokens_while_decoding if decodes else self.max_num_batched_tokens,
                           PROMPT_LOGPROB_ROWS_PER_STEP)
        for req in decodes + prompts:
            if left.tokens == 0:
                break
            if req.status is not RequestStatus.RUNNING or req.awaits_result:  # preempted this step, or async
                continue
            n = self._chunk(req, left)
            if n == 0:
                continue
            while not self.cache.grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                left.tokens += scheduled.pop(victim, 0)  # (its prefill / scored share is not given back)
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled[req] = n
                self._take(req, n, left)
        # forks only once no more preemption can come in this step (a victim is never forked)
        for req, n in list(scheduled.items()):
            self._fork_at_prompt_end(req, n, forked)

        while self.waiting and left.tokens > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            limit = self._limit(req, left)
            n = self.cache.admit(req, limit) if limit > 0 else 0  # may resume from the prefix cache
            if n == 0:
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            if req.queue_time is None:
                req.queue_time = time.monotonic() - req.arrival_time
            bisect.insort(self.running, req, key=_arrival)
            scheduled[req] = n
            self._take(req, n, left)
            self._fork_at_prompt_end(req, n, forked)
        return self._plan(scheduled, forked)

    def update(
        self,
        step: ScheduledStep,
        sampled_token_ids: list[int],
        logprobs: list[list[TokenLogprob] | None] | None = None,
        prompt_logprobs: list[list[TokenLogprob]] | None = None,
    ) -> list[EngineOutput]:
        """Apply a step's samples (one per sample row, in row order): append, stop, free. Rows of
        sequences that finished, were aborted or preempted since the step was scheduled are dropped
        (a preempted one samples that token again after recomputing). prompt_logprobs: one entry
        list per prompt-logprob row of the step."""
        deltas: dict[str, list[SequenceDelta]] = {}
        row = 0
        for req, first, count in step.prompt_logprob_runs:
            if not req.is_finished:  # a rerun after preemption scores the same tokens again
                k = req.params.prompt_logprobs
                req.prompt_logprobs[first : first + count] = [e[: k + 1] for e in prompt_logprobs[row : row + count]]
            row += count
        for i, (req, epoch) in enumerate(zip(step.sample_requests, step.sample_epochs)):
            if req.status is not RequestStatus.RUNNING or req.num_preemptions != epoch:
                continue
            req.num_tokens_in_flight -= 1
            self._append(req, sampled_token_ids[i], logprobs[i] if logprobs else None, deltas)
        outputs = []
        for request_id, ds in deltas.items():
            group = self.groups[request_id]
            sent = None
            if request_id in self._prompt_logprobs_due:  # sent with the first token of the sequence that scored them
                done = [q for q in group if q.num_output_tokens and None not in q.prompt_logprobs[1:]]
                if done:
                    self._prompt_logprobs_due.discard(request_id)
                    sent = done[0].prompt_logprobs
            outputs.append(self._output(group, ds, prompt_logprobs=sent))
        return outputs

    # ---- queries -------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(r.forks) for r in self.waiting + self.running)

    def check_invariants(self) -> None:
        """Every slot is owned by one running request or free; every block's reference count is
        its number of owners, and 0 exactly for free or cached blocks (the cache manager's check,
        with the snapshot pool's); a shared or cached block is full (never written again) for each
        owner; waiting sequences and unforked siblings own nothing; siblings
        belong to their group. Raises AssertionError."""
        pool, slots = self.cache.block_pool, self.cache.slot_pool
        bs = self.layout.block_size
        assert all(r.status is RequestStatus.RUNNING for r in self.running)
        assert all(r.status is RequestStatus.WAITING for r in self.waiting)
        assert all(not r.block_ids and r.state_slot is None for r in self.waiting), "a waiting request holds cache"
        assert len(self.running) <= self.max_num_seqs
        owned_slots = [r.state_slot for r in self.running]
        assert None not in owned_slots, "a running request has no state slot"
        assert len(owned_slots) == len(set(owned_slots)), "a state slot has two owners"
        assert sorted(owned_slots + list(slots.free)) == list(range(slots.num_slots)), "state slots leaked"
        owners = Counter(b for r in self.running for b in r.block_ids)
        self.cache.check_invariants(owners)
        for r in self.running:
            assert len(r.block_ids) >= self.layout.blocks_for(r.num_computed_tokens), f"{r} lacks blocks"
            for col, b in enumerate(r.block_ids):
                if owners[b] > 1 or pool.keys[b] is not None:  # shared or cached content: never written again
                    assert (col + 1) * bs <= r.num_computed_tokens, f"{r} may still write shared block {b}"
        live = {id(r) for g in self.groups.values() for r in g if not r.is_finished}
        assert {id(r) for r in self.running + self.waiting} <= live
        for request_id, group in self.groups.items():
            assert [s.index for s in group] == list(range(len(group))) and {s.request_id for s in group} == {request_id}
            pending = [s for s in group if s.status is RequestStatus.WAITING_FOR_FORK]
            assert pending == group[0].forks, "a sibling waits for a fork its parent does not know"
            if pending:
                parent = group[0]
                assert parent.status in (RequestStatus.RUNNING, RequestStatus.WAITING) and parent.num_output_tokens == 0
                assert all(not s.block_ids and s.state_slot is None and s.num_output_tokens == 0 for s in pending)

    # ---- internals -----------------------------------------------------------------------------
    def _fork_at_prompt_end(self, parent: Request, n: int, forked: dict[Request, list[Request]]) -> None:
        """If this step completes the parent's prompt, fork its waiting siblings from it now."""
        if not parent.forks or parent.num_computed_tokens + n != parent.num_tokens:
            return
        unforked = []
        for sib in parent.forks:
            if len(self.running) < self.max_num_seqs and self.cache.fork(parent, sib):
                sib.status = RequestStatus.RUNNING
                sib.num_computed_tokens = parent.num_prompt_tokens
                sib.queue_time = parent.queue_time
                bisect.insort(self.running, sib, key=_arrival)
                forked.setdefault(parent, []).append(sib)
            else:
                unforked.append(sib)  # no room: it prefills its prompt later
        parent.forks = unforked
        self._release_forks(parent)

    def _plan(self, scheduled: dict[Request, int], forked: dict[Request, list[Request]]) -> ScheduledStep:
        """Turn this step's decisions into a StepPlan and advance what it computes."""
        requests = list(scheduled)
        ids, sample_indices, sample_requests = [], [], []
        scored_indices, scored_targets, runs = [], [], []
        end = 0
        for req, n in scheduled.items():
            c = req.num_computed_tokens
            if n == 1 and req.last_token_on_device and c == req.num_tokens - 1:
                ids.append(FROM_DEVICE)
            else:
                ids += req.token_ids[c : c + n]
            if (count := self._num_scored(req, n)):  # fed positions c.. score prompt tokens c+1..
                scored_indices += range(end, end + count)
                scored_targets += req.token_ids[c + 1 : c + 1 + count]
                runs.append((req, c + 1, count))
            end += n
            if c + n == req.num_tokens:  # the fed tokens reach the end: sample the next one
                if req.num_output_tokens == 0:
                    self.prompt_tokens_total += req.num_prompt_tokens  # a complete pass over the prompt
                for seq in (req, *forked.get(req, ())):
                    sample_indices.append(end - 1)
                    sample_requests.append(seq)
        for req, n in scheduled.items():
            self.cache.computed(req, n)  # prefix caching: key filled blocks, snapshot at the prompt's last one
        # an empty step never runs: the cache work recorded so far waits for the next one that does
        changes = self.cache.take_step_changes() if scheduled else StepChanges.none()
        plan = StepPlan(
            slots=np.array([r.state_slot for r in requests], dtype=np.int64),
            num_cached=np.array([r.num_computed_tokens for r in requests], dtype=np.int64),
            num_new_tokens=np.array(list(scheduled.values()), dtype=np.int64),
            input_ids=np.array(ids, dtype=np.int64),
            sample_token_indices=np.array(sample_indices, dtype=np.int64),
            sampling=SamplingInputs.of(sample_requests, [r.state_slot for r in sample_requests]),
            table_updates=changes.table_updates,
            slot_copies_before=changes.slot_copies_before,
            block_copies_before=changes.block_copies_before,
            slot_copies=changes.slot_copies,
            block_copies=changes.block_copies,
            captures=changes.captures,
            prompt_logprob_indices=np.array(scored_indices, dtype=np.int64),
            prompt_logprob_targets=np.array(scored_targets, dtype=np.int64),
            prompt_logprob_k=max((r.params.prompt_logprobs for r, _, _ in runs), default=0),
        )
        for req, n in scheduled.items():
            req.num_computed_tokens += n
        for req in sample_requests:
            req.num_tokens_in_flight += 1
            req.last_token_on_device = True
        return ScheduledStep(plan, requests, sample_requests, [r.num_preemptions for r in sample_requests], runs)

    def _chunk(self, req: Request, left: _StepBudget) -> int:
        """Tokens the request feeds this step (0: none) within what the step has left."""
        limit = self._limit(req, left)
        return min(req.num_tokens - req.num_computed_tokens, limit) if limit > 0 else 0

    def _limit(self, req: Request, left: _StepBudget) -> int:
        """The most tokens the request may feed this step, of what the step has left."""
        limit = left.tokens
        if _prefills(req):
            limit = min(limit, left.prefill)
        if self._scores_prompt(req):
            limit = min(limit, left.scored)
        return limit

    def _take(self, req: Request, n: int, left: _StepBudget) -> None:
        left.tokens -= n
        if _prefills(req):
            left.prefill -= n
        left.scored -= self._num_scored(req, n)

    def _scores_prompt(self, req: Request) -> bool:
        """The request's prompt logprobs are still to be computed, by this sequence's prefill."""
        return req.request_id in self._prompt_logprobs_due and req.num_output_tokens == 0

    def _num_scored(self, req: Request, n: int) -> int:
        """Prompt tokens scored by feeding n more tokens: position p's logits score token p + 1."""
        if not self._scores_prompt(req):
            return 0
        return max(0, min(req.num_computed_tokens + n, req.num_prompt_tokens - 1) - req.num_computed_tokens)

    def _append(self, req: Request, token: int, lp, deltas: dict[str, list[SequenceDelta]]) -> None:
        finished = req.append_token(token)
        self.generation_tokens_total += 1
        delta = SequenceDelta(index=req.index, token_ids=[token], logprobs=None if lp is None else [lp])
        deltas.setdefault(req.request_id, []).append(delta)
        if finished:
            self.cache.finished(req)  # prefix caching: snapshot its final state
            self._remove(req)
            self._finish(req, req.finish_reason)
            delta.finish_reason, delta.stop_reason = req.finish_reason, req.stop_reason

    def _preempt(self, req: Request) -> None:
        self._remove(req)
        req.num_computed_tokens = 0
        req.num_tokens_in_flight = 0  # dropped when its step returns; sampled again after the recompute
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions_total += 1
        bisect.insort(self.waiting, req, key=_arrival)

    def _remove(self, req: Request) -> None:
        """Take a request out of the queues and release its cache."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self.cache.free(req)
        req.last_token_on_device = False

    def _release_forks(self, parent: Request) -> None:
        for sib in parent.forks:
            sib.status = RequestStatus.WAITING
            bisect.insort(self.waiting, sib, key=_arrival)
        parent.forks = []

    def _finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _output(self, group: list[Request], deltas: list[SequenceDelta], prompt_logprobs=None) -> EngineOutput:
        first = group[0]
        finished = all(r.is_finished for r in group)
        if finished:
            del self.groups[first.request_id]
            self._prompt_logprobs_due.discard(first.request_id)
        return EngineOutput(first.request_id, deltas, finished, num_preemptions=sum(r.num_preemptions for r in group),
                            queue_time=first.queue_time, num_cached_tokens=first.num_cached_tokens,
                            prompt_logprobs=prompt_logprobs)


@dataclass
class _StepBudget:
    """What the step being scheduled may still take."""

    tokens: int  # of max_num_batched_tokens
    prefill: int  # prompt tokens (max_prefill_tokens_while_decoding while any sequence decodes)
    scored: int  # prompt-logprob rows


def _prefills(req: Request) -> bool:
    """The request feeds its prompt (or recomputes after preemption), not one decode token."""
    return req.num_pending_tokens > 1 or req.num_computed_tokens < req.num_prompt_tokens


def _arrival(req: Request) -> tuple[int, int]:
    return req.arrival
