"""Scheduler: which requests run in the next model step, and how many tokens each feeds.

There are no prefill and decode phases: every running request wants `num_pending_tokens` more
tokens (the rest of its prompt, or the token sampled last step) and gets as many as the step's
token budget allows. Order within a step: running decodes, then running prompt chunks, then
waiting requests admitted first come, first served while a state slot, KV blocks for their first
chunk, a `max_num_seqs` place and budget remain. When a running request needs a KV block and none
is free, the newest running request is preempted (blocks and slot freed, requeued, recomputed).

n > 1: choice 0 prefills the prompt once; the step that finishes the prompt samples one row per
choice, and the other choices fork from it (state slot and KV blocks copied by the model runner,
see `take_forks`). Pure Python, no torch. Invariants: `check_invariants`.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from hybridserve.engine.kv_cache import KVCache
from hybridserve.engine.outputs import EngineOutput, SequenceDelta, TokenLogprob
from hybridserve.engine.request import Request, RequestStatus
from hybridserve.engine.state_cache import StateCache


@dataclass
class ScheduledBatch:
    """One step's work, in batch order (decodes first)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # logits rows to sample per request: 0 (a prompt chunk that does not reach the end), 1, or
    # 1 + forks (choice 0 of an n > 1 request finishing its prompt)
    num_samples: list[int] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, each continuing carried state (a one-token prompt is not a decode)."""
        return all(n == 1 for n in self.num_new_tokens) and all(r.num_computed_tokens > 0 for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class Fork:
    """Copy a parent's prompt state into a sibling (n > 1): one slot, and the prompt's KV blocks."""

    src_slot: int
    dst_slot: int
    src_blocks: list[int]
    dst_blocks: list[int]


class Scheduler:
    """Token-budget continuous batching over a KV block pool and a Mamba state slot pool."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_blocks: int,
        num_slots: int,
        block_size: int,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.kv = KVCache(num_blocks, block_size)
        self.states = StateCache(num_slots)
        self.waiting: list[Request] = []  # sorted by arrival (FCFS; preempted ones keep their place)
        self.running: list[Request] = []  # sorted by arrival; the last is the newest
        self.groups: dict[str, list[Request]] = {}  # request_id -> its n sequences
        self.pending_forks: list[Fork] = []
        self.num_preemptions_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._next_arrival = 0

    # ---- admission -----------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Reject at admission what could never run, instead of letting it starve."""
        self.check_request_fits(num_prompt_tokens, max_tokens, self.max_model_len, self.kv.num_blocks, self.kv.block_size)

    @staticmethod
    def check_request_fits(
        num_prompt_tokens: int, max_tokens: int, max_model_len: int, num_blocks: int, block_size: int
    ) -> None:
        """Raise ValueError unless prompt + max_tokens fits the context and, alone, the KV cache
        (the last sampled token is never fed back, so it needs no KV)."""
        total = num_prompt_tokens + max_tokens
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if total > max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"maximum context length {max_model_len}"
            )
        blocks = -(-(total - 1) // block_size)
        if blocks > num_blocks:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks, "
                f"more than the cache holds ({num_blocks})"
            )

    def add(self, sequences: list[Request]) -> None:
        """Queue the n sequences of one request (index 0 first)."""
        first = sequences[0]
        self.check_fits(first.num_prompt_tokens, first.max_tokens)
        if first.request_id in self.groups:
            raise ValueError(f"request id {first.request_id!r} is already in the engine")
        arrival = self._next_arrival
        self._next_arrival += 1
        for seq in sequences:
            seq.arrival = (arrival, seq.index)
        self.groups[first.request_id] = sequences
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
                parent = group[0]
                parent.forks.remove(seq)
            else:
                self._remove(seq)
            if seq.forks:  # choice 0 aborted before its prompt was done: siblings prefill themselves
                for sib in seq.forks:
                    sib.status = RequestStatus.WAITING
                    bisect.insort(self.waiting, sib, key=_arrival)
                seq.forks = []
            self._finish(seq, "abort")
            deltas.append(SequenceDelta(index=seq.index, token_ids=[], finish_reason="abort"))
        return self._output(group, deltas) if deltas else None

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        decodes, prompts = [], []
        for r in self.running:
            (decodes if r.num_pending_tokens == 1 else prompts).append(r)
        for req in decodes + prompts:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted by an older request this step
                continue
            n = min(req.num_pending_tokens, budget)
            while not self.kv.allocate(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                budget += scheduled.pop(victim, 0)
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled[req] = n
                budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_pending_tokens, budget)
            # all-or-nothing: a request that does not get its blocks holds none
            if self.states.num_free_slots == 0 or not self.kv.allocate(req, n):
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            self.states.allocate(req)
            req.status = RequestStatus.RUNNING
            if req.queue_time is None:
                req.queue_time = time.monotonic() - req.arrival_time
            bisect.insort(self.running, req, key=_arrival)
            scheduled[req] = n
            budget -= n

        batch = ScheduledBatch()
        for req, n in scheduled.items():
            reaches_end = req.num_computed_tokens + n == req.num_tokens
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            batch.num_samples.append(1 + len(req.forks) if reaches_end else 0)
        return batch

    def update(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: list[int],
        logprobs: list[list[TokenLogprob]] | None = None,
    ) -> list[EngineOutput]:
        """Apply a step's results: advance computed tokens, append samples, stop, fork, free.

        sampled_token_ids / logprobs: one entry per sampled row, in batch order.
        """
        deltas: dict[str, list[SequenceDelta]] = {}
        row = 0
        for req, n, s in zip(batch.requests, batch.num_new_tokens, batch.num_samples):
            rows = range(row, row + s)
            row += s
            if req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += n
            if s == 0:
                continue
            if req.num_output_tokens == 0:  # the prompt's first complete pass
                self.prompt_tokens_total += req.num_prompt_tokens
            self._append(req, sampled_token_ids[rows[0]], logprobs and logprobs[rows[0]], deltas)
            if req.forks:
                for sib, i in zip(req.forks, rows[1:]):
                    sib.status = RequestStatus.WAITING
                    if not self._append(sib, sampled_token_ids[i], logprobs and logprobs[i], deltas):
                        self._fork(req, sib)
                req.forks = []
        outputs = []
        for request_id, ds in deltas.items():
            outputs.append(self._output(self.groups[request_id], ds))
        return outputs

    def take_forks(self) -> list[Fork]:
        """State copies the model runner must do before the next step."""
        forks, self.pending_forks = self.pending_forks, []
        return forks

    # ---- queries -------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(r.forks) for r in self.waiting + self.running)

    def check_invariants(self) -> None:
        """Every block and slot is free or owned by exactly one running request (raises AssertionError)."""
        owned_blocks = [b for r in self.running for b in r.block_ids]
        owned_slots = [r.state_slot for r in self.running]
        assert all(r.status is RequestStatus.RUNNING for r in self.running)
        assert all(not r.block_ids and r.state_slot is None for r in self.waiting), "a waiting request holds cache"
        assert None not in owned_slots, "a running request has no state slot"
        assert len(owned_blocks) == len(set(owned_blocks)), "a KV block has two owners"
        assert len(owned_slots) == len(set(owned_slots)), "a state slot has two owners"
        assert sorted(owned_blocks + list(self.kv.free_blocks)) == list(range(self.kv.num_blocks)), "KV blocks leaked"
        assert sorted(owned_slots + list(self.states.free_slots)) == list(range(self.states.num_slots)), "slots leaked"
        assert len(self.running) <= self.max_num_seqs
        live = {id(r) for g in self.groups.values() for r in g if not r.is_finished}
        assert {id(r) for r in self.running + self.waiting} <= live

    # ---- internals -----------------------------------------------------------------------------
    def _append(self, req: Request, token: int, lp, deltas: dict[str, list[SequenceDelta]]) -> bool:
        finished = req.append_token(token)
        self.generation_tokens_total += 1
        delta = SequenceDelta(index=req.index, token_ids=[token], logprobs=None if lp is None else [lp])
        deltas.setdefault(req.request_id, []).append(delta)
        if finished:
            if req.status is RequestStatus.RUNNING:
                self._remove(req)
            self._finish(req, req.finish_reason)
            delta.finish_reason, delta.stop_reason = req.finish_reason, req.stop_reason
        return finished

    def _fork(self, parent: Request, sib: Request) -> None:
        """Give a sibling its own slot and a copy of the parent's prompt state, or requeue it."""
        num_prompt = parent.num_prompt_tokens
        if len(self.running) < self.max_num_seqs and self.states.allocate(sib):
            if self.kv.allocate(sib, num_prompt):
                sib.num_computed_tokens = num_prompt
                sib.status = RequestStatus.RUNNING
                bisect.insort(self.running, sib, key=_arrival)
                nb = len(sib.block_ids)
                self.pending_forks.append(Fork(parent.state_slot, sib.state_slot, parent.block_ids[:nb], sib.block_ids))
                return
            self.states.free(sib)
        bisect.insort(self.waiting, sib, key=_arrival)  # no room: it recomputes its prompt later

    def _preempt(self, req: Request) -> None:
        self._remove(req)
        req.num_computed_tokens = 0
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
        self.kv.free(req)
        self.states.free(req)

    def _finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _output(self, group: list[Request], deltas: list[SequenceDelta]) -> EngineOutput:
        first = group[0]
        finished = all(r.is_finished for r in group)
        if finished:
            del self.groups[first.request_id]
        return EngineOutput(first.request_id, deltas, finished, num_preemptions=sum(r.num_preemptions for r in group),
                            queue_time=first.queue_time)


def _arrival(req: Request) -> tuple[int, int]:
    return req.arrival
