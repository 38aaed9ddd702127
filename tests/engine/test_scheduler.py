"""The scheduler alone, on synthetic requests (no model, no torch): budgets, chunking, FCFS order,
decodes first, preemption order, forks, aborts, and that every block and slot comes back."""

from __future__ import annotations

import pytest

from hybridserve.engine.request import Request, RequestStatus
from hybridserve.engine.scheduler import Scheduler
from hybridserve.sampling_params import SamplingParams

EOS = 2


def make_scheduler(**kw) -> Scheduler:
    args = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_blocks=64, num_slots=8, block_size=4)
    args.update(kw)
    return Scheduler(**args)


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
    outputs = sched.update(batch, [token] * sum(batch.num_samples))
    sched.check_invariants()
    return batch, outputs


def scheduled(batch) -> dict[str, int]:
    return {f"{r.request_id}#{r.index}": n for r, n in zip(batch.requests, batch.num_new_tokens)}


def test_token_budget_chunks_long_prompts_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=16)
    (a,) = add(sched, "a", 40)
    sizes = []
    while a.num_output_tokens == 0:
        batch, _ = step(sched)
        sizes.append(batch.num_new_tokens[0])
        assert batch.num_samples == [1 if a.num_output_tokens else 0]
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
    assert sched.kv.num_free_blocks == 0
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
    assert sched.kv.num_free_blocks == 6 and sched.states.num_free_slots == 8


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
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    sched = make_scheduler()
    (c,) = add(sched, "c", 5, max_tokens=3)
    for _ in range(3):
        step(sched)
    assert c.finish_reason == "length" and c.output_token_ids == [7, 7, 7]


def test_n_choices_prefill_once_then_fork():
    sched = make_scheduler(max_num_batched_tokens=8)
    seqs = add(sched, "a", 12, n=3)
    batch, _ = step(sched)
    assert batch.num_samples == [0] and len(batch) == 1  # only choice 0 prefills
    batch, outputs = step(sched)
    assert batch.num_samples == [3]  # the prompt's last step samples one row per choice
    assert [d.index for d in outputs[0].deltas] == [0, 1, 2]
    forks = sched.take_forks()
    assert len(forks) == 2
    assert {f.dst_slot for f in forks} == {seqs[1].state_slot, seqs[2].state_slot}
    assert all(f.src_slot == seqs[0].state_slot and f.src_blocks == seqs[0].block_ids[:3] for f in forks)
    assert all(s.num_computed_tokens == 12 and s.num_tokens == 13 for s in seqs)
    batch, _ = step(sched)
    assert batch.num_new_tokens == [1, 1, 1]


def test_fork_without_room_falls_back_to_recompute():
    sched = make_scheduler(max_num_seqs=1)
    seqs = add(sched, "a", 6, n=2, max_tokens=3)
    step(sched)
    assert seqs[1].status is RequestStatus.WAITING and seqs[1].output_token_ids == [7]
    assert not sched.take_forks()
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
    assert sched.kv.num_free_blocks == 24 and sched.states.num_free_slots == 8
    sched.check_invariants()


def test_random_workload_keeps_invariants():
    import random

    rng = random.Random(0)
    sched = make_scheduler(num_blocks=20, block_size=4, max_num_batched_tokens=24, max_num_seqs=5, num_slots=5)
    live = []
    for i in range(300):
        if rng.random() < 0.3:
            rid = f"r{i}"
            add(sched, rid, rng.randint(1, 40), max_tokens=rng.randint(1, 30), n=rng.choice([1, 1, 2]))
            live.append(rid)
        if live and rng.random() < 0.05:
            sched.abort(live.pop(rng.randrange(len(live))))
            sched.check_invariants()
        step(sched, token=EOS if rng.random() < 0.05 else 7)
    while sched.has_unfinished():
        step(sched)
    assert sched.kv.num_free_blocks == 20 and sched.states.num_free_slots == 5
    assert sched.num_preemptions_total > 0
