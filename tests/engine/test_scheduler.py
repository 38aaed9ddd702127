"""The scheduler alone, on synthetic requests (no model, no torch): budgets, chunking, FCFS order,
decodes first, preemption order, forks, aborts, and that every block and slot comes back."""

from __future__ import annotations

import numpy as np
import pytest

from hybridserve.engine.cache_manager import CacheLayout
from hybridserve.engine.request import Request, RequestStatus
from hybridserve.engine.scheduler import Scheduler
from hybridserve.engine.step_plan import FROM_DEVICE
from hybridserve.sampling_params import SamplingParams

EOS = 2


def make_scheduler(*, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=None,
                   **layout) -> Scheduler:
    fields = dict(max_model_len=256, num_blocks=64, num_slots=8, block_size=4, kv_dtype="float32", state_dtype="float32")
    fields.update(layout)
    return Scheduler(layout=CacheLayout(**fields), max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding)


def num_free(sched: Scheduler) -> tuple[int, int]:
    return sched.cache.block_pool.num_free, sched.cache.slot_pool.num_free


def add(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 8, n: int = 1) -> list[Request]:
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0)
    seqs = [
        Request(rid, list(range(10, 10 + prompt_len)), params, index=i, max_tokens=max_tokens,
                stop_token_ids=frozenset({EOS}))
        for i in range(n)
    ]
    sched.add(seqs)
    return seqs


def step(sched: Scheduler, token: int = 7):
    """Schedule, pretend the model sampled `token` for every sampled row, apply."""
    batch = sched.schedule()
    outputs = sched.update(batch, [token] * batch.plan.num_samples)
    sched.check_invariants()
    return batch, outputs


def scheduled(batch) -> dict[str, int]:
    return {f"{r.request_id}#{r.index}": int(n) for r, n in zip(batch.requests, batch.plan.num_new_tokens)}


def num_samples(batch) -> list[int]:
    """Sample rows that read each fed sequence's logits, in batch order."""
    owners = np.searchsorted(np.cumsum(batch.plan.num_new_tokens), batch.plan.sample_token_indices, side="right")
    return np.bincount(owners, minlength=len(batch)).tolist()


def test_token_budget_chunks_long_prompts_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=16)
    (a,) = add(sched, "a", 40)
    sizes = []
    while a.num_output_tokens == 0:
        batch, _ = step(sched)
        sizes.append(int(batch.plan.num_new_tokens[0]))
        assert num_samples(batch) == [1 if a.num_output_tokens else 0]
    assert sizes == [16, 16, 8]
    assert a.num_computed_tokens == 40 and a.num_tokens == 41


def test_decodes_first_then_prompt_chunks_then_fcfs_admission():
    sched = make_scheduler(max_num_batched_tokens=20)
    add(sched, "a", 3)
    step(sched)  # a prefilled, now decoding
    add(sched, "b", 30)
    add(sched, "c", 2)
    batch, _ = step(sched)
    # a's decode comes first; b's prompt takes the rest; c (behind b) must wait: strict FCFS
    assert scheduled(batch) == {"a#0": 1, "b#0": 19}
    batch, _ = step(sched)
    assert scheduled(batch) == {"a#0": 1, "b#0": 11, "c#0": 2}
    assert [r.request_id for r in batch.requests] == ["a", "b", "c"]


def test_max_num_seqs_and_free_slots_cap_admission():
    sched = make_scheduler(max_num_seqs=2, num_slots=3)
    for rid in "abc":
        add(sched, rid, 4)
    batch, _ = step(sched)
    assert set(scheduled(batch)) == {"a#0", "b#0"}
    assert sched.num_waiting == 1
    sched = make_scheduler(max_num_seqs=8, num_slots=1)
    for rid in "ab":
        add(sched, rid, 4)
    batch, _ = step(sched)
    assert set(scheduled(batch)) == {"a#0"}


def test_preempts_the_newest_request_and_requeues_it_in_arrival_order():
    # 6 blocks of 4 tokens: three 8-token prompts fill them; each first decode needs a new block.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64, max_num_seqs=3)
    a, b, c = (add(sched, rid, 8, max_tokens=8)[0] for rid in "abc")
    step(sched)
    assert num_free(sched)[0] == 0
    (d,) = add(sched, "d", 2)  # arrives later, waits (max_num_seqs)
    batch, _ = step(sched)  # a needs a block: c (newest) is preempted; b takes the second freed block
    assert scheduled(batch) == {"a#0": 1, "b#0": 1}
    assert c.status is RequestStatus.WAITING and c.num_preemptions == 1 and sched.num_preemptions_total == 1
    assert [r.request_id for r in sched.waiting] == ["c", "d"]  # c keeps its place ahead of d
    assert c.num_computed_tokens == 0 and not c.block_ids and c.state_slot is None
    assert c.num_tokens == 9  # prompt + the token it had generated: all recomputed later
    while sched.has_unfinished():
        step(sched)
    assert all(r.num_output_tokens == 8 and r.finish_reason == "length" for r in (a, b, c))
    assert num_free(sched) == (6, 8)


def test_the_oldest_request_keeps_running_under_pressure():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = add(sched, "a", 8, max_tokens=8)[0]
    b = add(sched, "b", 8, max_tokens=8)[0]
    step(sched)
    batch, _ = step(sched)  # no block is free: b (newest) goes, a continues
    assert scheduled(batch) == {"a#0": 1} and b.num_preemptions == 1
    while sched.has_unfinished():
        step(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8


def test_requests_that_can_never_fit_are_rejected_at_admission():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(ValueError, match="KV blocks"):
        add(sched, "big", 10, max_tokens=8)  # 17 tokens of KV > 16
    add(sched, "ok", 9, max_tokens=8)  # 16 tokens of KV fits exactly
    with pytest.raises(ValueError, match="maximum context length"):
        add(make_scheduler(max_model_len=20), "long", 15, max_tokens=6)
    with pytest.raises(ValueError, match="empty"):
        add(sched, "empty", 0)


def test_stop_token_and_max_tokens_finish_and_free():
    sched = make_scheduler()
    (a,) = add(sched, "a", 5, max_tokens=3)
    (b,) = add(sched, "b", 5, max_tokens=10)
    step(sched, token=7)
    _, outputs = step(sched, token=EOS)  # both sample eos: both stop
    assert a.finish_reason == "stop" and a.stop_reason == EOS
    assert {o.request_id for o in outputs if o.finished} == {"a", "b"}
    assert num_free(sched)[0] == 64
    sched = make_scheduler()
    (c,) = add(sched, "c", 5, max_tokens=3)
    for _ in range(3):
        step(sched)
    assert c.finish_reason == "length" and c.output_token_ids == [7, 7, 7]


def test_n_choices_prefill_once_then_fork():
    sched = make_scheduler(max_num_batched_tokens=8, num_blocks=16)
    seqs = add(sched, "a", 14, n=3)  # 3 full blocks of 4 and a tail of 2
    batch, _ = step(sched)
    assert num_samples(batch) == [0] and len(batch) == 1  # only choice 0 prefills
    assert seqs[1].status is RequestStatus.WAITING_FOR_FORK and seqs[1].state_slot is None
    batch = sched.schedule()
    # the step that completes the prompt forks the siblings at once: one sample row per choice,
    # all reading the parent's last token
    assert batch.sample_requests == seqs and len(batch) == 1
    assert batch.plan.sample_token_indices.tolist() == [5, 5, 5]
    assert batch.plan.sampling.slots.tolist() == [s.state_slot for s in seqs]
    parent_blocks = seqs[0].block_ids
    for sib in seqs[1:]:
        assert sib.status is RequestStatus.RUNNING and sib.num_computed_tokens == 14
        assert sib.block_ids[:3] == parent_blocks[:3] and sib.block_ids[3] not in parent_blocks  # tail copied
    assert [sched.cache.block_pool.refcounts[b] for b in parent_blocks] == [3, 3, 3, 1]
    assert sorted(map(tuple, batch.plan.slot_copies.tolist())) == [(seqs[0].state_slot, s.state_slot) for s in seqs[1:]]
    assert sorted(map(tuple, batch.plan.block_copies.tolist())) == [(parent_blocks[3], s.block_ids[3]) for s in seqs[1:]]
    outputs = sched.update(batch, [7, 8, 9])
    sched.check_invariants()
    assert [(d.index, d.token_ids) for d in outputs[0].deltas] == [(0, [7]), (1, [8]), (2, [9])]
    assert all(s.num_computed_tokens == 14 and s.num_tokens == 15 for s in seqs)
    batch, _ = step(sched)
    assert batch.plan.num_new_tokens.tolist() == [1, 1, 1]
    assert batch.plan.input_ids.tolist() == [FROM_DEVICE] * 3  # each reads its own sampled token on the device


def test_a_choice_that_ends_on_its_first_token_leaves_its_siblings_intact():
    """Issue 10: choice 0 stopping at once must not free state a sibling still forks from or shares."""
    sched = make_scheduler(num_blocks=16)
    seqs = add(sched, "a", 9, n=3, max_tokens=4)
    batch = sched.schedule()
    sched.update(batch, [EOS, 7, EOS])  # choices 0 and 2 stop on their first token
    sched.check_invariants()
    assert seqs[0].finish_reason == "stop" and seqs[2].finish_reason == "stop"
    assert seqs[1].status is RequestStatus.RUNNING and seqs[1].state_slot is not None
    shared = seqs[1].block_ids[:2]
    assert [sched.cache.block_pool.refcounts[b] for b in shared] == [1, 1]  # only the survivor holds them
    while sched.has_unfinished():
        step(sched)
    assert seqs[1].output_token_ids == [7, 7, 7, 7]
    assert num_free(sched) == (16, 8)


def test_fork_without_room_falls_back_to_recompute():
    sched = make_scheduler(max_num_seqs=1)
    seqs = add(sched, "a", 6, n=2, max_tokens=3)
    step(sched)
    assert seqs[1].status is RequestStatus.WAITING and seqs[1].output_token_ids == []  # prefills itself later
    while sched.has_unfinished():
        step(sched)
    assert all(s.num_output_tokens == 3 for s in seqs)


def test_abort_anywhere_frees_everything():
    sched = make_scheduler(max_num_batched_tokens=10, num_blocks=24, max_num_seqs=3)
    add(sched, "a", 30, max_tokens=50)  # mid-prefill when aborted
    add(sched, "b", 3, max_tokens=50, n=2)
    add(sched, "c", 3, max_tokens=50)  # waiting
    for _ in range(4):
        step(sched)
    for rid in ("c", "a"):
        out = sched.abort(rid)
        assert out.finished and all(d.finish_reason == "abort" for d in out.deltas)
        sched.check_invariants()
    out = sched.abort("b", [1])
    assert not out.finished and [d.index for d in out.deltas] == [1]
    assert sched.abort("b").finished
    assert sched.abort("b") is None  # unknown now
    assert not sched.has_unfinished()
    assert num_free(sched) == (24, 8)
    sched.check_invariants()


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_invariants(seed):
    """Adds (n in 1..3), aborts of whole requests and of single choices, stop tokens sampled at
    random per row (a choice may end on its first token while its siblings run), preemption under
    a small pool: the invariants hold after every step and everything is free at the end."""
    import random

    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=20, block_size=4, max_num_batched_tokens=24, max_num_seqs=5, num_slots=5)
    live, groups = [], []
    for i in range(300):
        if rng.random() < 0.3:
            rid = f"r{i}"
            groups.append(add(sched, rid, rng.randint(1, 40), max_tokens=rng.randint(1, 30), n=rng.randint(1, 3)))
            live.append(rid)
        if live and rng.random() < 0.05:
            rid = live.pop(rng.randrange(len(live)))
            sched.abort(rid, None if rng.random() < 0.5 else [rng.randrange(3)])
            sched.check_invariants()
        batch = sched.schedule()
        sched.update(batch, [EOS if rng.random() < 0.1 else rng.randrange(3, 50) for _ in batch.sample_requests])
        sched.check_invariants()
    while sched.has_unfinished():
        step(sched)
    assert num_free(sched) == (20, 5)
    assert all(r.is_finished for g in groups for r in g)
    assert sched.num_preemptions_total > 0
    # choice 0 ended on its first token while a sibling went on: the case that crashed the engine
    assert any(g[0].output_token_ids == [EOS] and any(s.num_output_tokens > 1 for s in g[1:]) for g in groups)


def test_prompt_tokens_are_capped_while_sequences_decode():
    sched = make_scheduler(max_num_batched_tokens=32, max_prefill_tokens_while_decoding=6)
    add(sched, "a", 40)
    batch, _ = step(sched)
    assert scheduled(batch) == {"a#0": 32}  # nothing decodes: the prompt gets the whole budget
    step(sched)  # a: 8 more prompt tokens and its first sample
    add(sched, "b", 20)
    add(sched, "c", 3)
    sizes = []
    while any(r.num_output_tokens == 0 for r in sched.running + sched.waiting):
        batch, _ = step(sched)
        sizes.append(scheduled(batch))
    # a decodes every step; b and c share 6 prompt tokens per step, c after b (FCFS)
    assert sizes[0] == {"a#0": 1, "b#0": 6} and all(d["a#0"] == 1 for d in sizes)
    assert all(sum(v for k, v in d.items() if k != "a#0") <= 6 for d in sizes)
    assert sizes[3] == {"a#0": 1, "b#0": 2, "c#0": 3}
