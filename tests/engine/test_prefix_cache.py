"""Prefix caching in the scheduler and cache manager alone (no model): where snapshots are taken,
which hit a new prompt gets and the copies its first step carries, eviction of cached blocks and of
snapshots, and the invariants under a random workload with shared prefixes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_scheduler import EOS, add, make_scheduler, num_free, step

from hybridserve.engine import cache_manager
from hybridserve.engine.request import Request
from hybridserve.sampling_params import SamplingParams


def add_prompt(sched, rid: str, prompt: list[int], max_tokens: int = 4, n: int = 1) -> list[Request]:
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=0)
    seqs = [Request(rid, prompt, params, index=i, max_tokens=max_tokens, stop_token_ids=frozenset({EOS}))
            for i in range(n)]
    sched.add(seqs)
    return seqs


def run_to_end(sched, token: int = 7) -> list:
    batches = []
    while sched.has_unfinished():
        batches.append(step(sched, token)[0])
    return batches


def rows(sched, *snapshots) -> list[int]:
    return [sched.layout.snapshot_row(s.row) for s in snapshots]


def test_a_prompt_is_snapshotted_at_its_last_full_block_inside_its_chunk():
    sched = make_scheduler(num_snapshots=4, block_size=4)
    (a,) = add(sched, "a", 10, max_tokens=1)
    batch, _ = step(sched)
    assert batch.plan.num_new_tokens.tolist() == [10] and a.is_finished  # one step: no cut at the snapshot point
    snap = next(s for s in sched.cache.snapshots.entries.values() if not s.final)
    assert snap.depth == 8 and not snap.tail
    slot = int(batch.plan.slots[0])  # a's (freed since: it finished)
    assert batch.plan.captures.tolist() == [[slot, *rows(sched, snap), 8]]  # taken by the forward, inside the chunk
    assert not len(batch.plan.slot_copies)


def test_two_snapshot_points_inside_one_chunk_are_both_captured():
    sched = make_scheduler(num_snapshots=4, block_size=4)
    add_prompt(sched, "a", [10 + i for i in range(8)] + [1, 2, 3, 4, 5], max_tokens=1)  # snapshots at 12, 13
    run_to_end(sched)
    (c,) = add_prompt(sched, "c", [10 + i for i in range(8)] + [50 + i for i in range(12)], max_tokens=1)
    batch, _ = step(sched)  # c leaves a's cached blocks at 8 (a branch point) and ends its last full block at 16
    assert c.num_cached_tokens == 0 and batch.plan.num_new_tokens.tolist() == [20] and c.num_output_tokens == 1
    assert sorted(batch.plan.captures[:, 2].tolist()) == [8, 16] and not len(batch.plan.slot_copies)
    depths = {s.depth: s.anchor for s in sched.cache.snapshots.entries.values() if not s.final}
    assert depths[8] == c.block_keys[1] and depths[16] == c.block_keys[3]


def test_a_prompt_extending_a_finished_requests_text_hits_at_its_final_state():
    sched = make_scheduler(num_snapshots=4, block_size=4)
    (a,) = add(sched, "a", 10, max_tokens=5)
    run_to_end(sched)
    text = list(a.token_ids)  # 10 prompt + 5 sampled tokens; the last one was never fed: 14 in the state
    a_blocks = list(sched.cache.block_pool.by_key.values())
    final = sched.cache.snapshots.entries[max(sched.cache.snapshots.entries, key=lambda k: sched.cache.snapshots.entries[k].depth)]
    assert (final.depth, final.tail) == (14, (7, 7))
    (b,) = add_prompt(sched, "b", text + [99])
    batch = sched.schedule()
    assert b.num_cached_tokens == 14 and batch.plan.num_cached.tolist() == [14]
    assert batch.plan.input_ids.tolist() == text[14:] + [99]  # only the rest is fed
    # a's final state is saved and restored before the forward; the restore reads a's (freed) slot,
    # since the save into the snapshot row happens in the same copy
    (save_src, save_dst), (restore_src, restore_dst) = batch.plan.slot_copies_before.tolist()
    assert save_dst == rows(sched, final)[0] and restore_src == save_src and restore_dst == b.state_slot
    (tail_src, tail_dst), = batch.plan.block_copies_before.tolist()  # the partial block: copy-on-write
    assert tail_src in a_blocks and tail_dst == b.block_ids[3] and tail_src not in b.block_ids
    assert all(blk in a_blocks for blk in b.block_ids[:3])  # the full blocks are shared, not copied
    sched.update(batch, [7])
    sched.check_invariants()
    assert (sched.cache.queries_total, sched.cache.hits_total) == (10 + 16, 14)


def test_a_prompt_extending_a_cached_prompt_by_a_block_hits_at_its_last_full_block():
    sched = make_scheduler(num_snapshots=4, block_size=4)
    (a,) = add(sched, "a", 10, max_tokens=2)
    run_to_end(sched)
    (b,) = add_prompt(sched, "b", a.token_ids[:10] + [40, 41, 42, 43])  # a's prompt + one more block, not a's answer
    batch, _ = step(sched)
    assert b.num_cached_tokens == 8 and batch.plan.input_ids.tolist()[:2] == [18, 19]
    assert len(batch.plan.block_copies_before) == 0  # block-aligned: nothing to copy-on-write
    # and a prompt of exactly a's 10 tokens hits at 8 too: at least one token is always fed
    (c,) = add_prompt(sched, "c", a.token_ids[:10])
    step(sched)
    assert c.num_cached_tokens == 8


def test_no_hit_below_one_block_or_for_a_different_first_block():
    sched = make_scheduler(num_snapshots=4, block_size=4)
    add(sched, "a", 3, max_tokens=3)  # 5 tokens fed: one block
    run_to_end(sched)
    (b,) = add_prompt(sched, "b", [10, 11, 12, 99, 5, 6])  # same first 3 tokens, then different
    (c,) = add_prompt(sched, "c", [9, 11, 12, 7, 7, 5])
    run_to_end(sched)
    assert b.num_cached_tokens == 0 and c.num_cached_tokens == 0


def test_evicted_blocks_invalidate_snapshots_and_plain_free_blocks_go_first():
    sched = make_scheduler(num_snapshots=4, block_size=4, num_blocks=8)
    (a,) = add(sched, "a", 12, max_tokens=1)
    run_to_end(sched)
    pool = sched.cache.block_pool
    assert len(pool.cached) == 3 and len(pool.free) == 5  # a's 3 full blocks stay resident, unreferenced
    add_prompt(sched, "b", [200 + i for i in range(20)], max_tokens=1)  # 5 blocks: only plain free ones
    run_to_end(sched)
    assert len(pool.cached) >= 3 and all(k in pool.by_key for k in a.block_keys)
    add_prompt(sched, "c", [300 + i for i in range(28)], max_tokens=1)  # 7 blocks: must evict a's (oldest)
    run_to_end(sched)
    assert not any(k in pool.by_key for k in a.block_keys)
    (d,) = add_prompt(sched, "d", a.token_ids[:12] + [1, 2])
    run_to_end(sched)
    assert d.num_cached_tokens == 0  # a's snapshot is still held, but its blocks are gone


def test_the_snapshot_pool_is_lru_and_a_finish_never_evicts_a_prompt_snapshot_of_its_own_chain():
    sched = make_scheduler(num_snapshots=2, block_size=4)
    snaps = sched.cache.snapshots
    (a,) = add(sched, "a", 9, max_tokens=1)  # snapshots at 8 (its prompt's last full block) and 9 (its end)
    run_to_end(sched)
    assert [(s.depth, s.final) for s in snaps.entries.values()] == [(8, False), (9, True)]
    (c,) = add_prompt(sched, "c", a.token_ids[:9] + [5], max_tokens=1)  # hits a's final state
    run_to_end(sched)
    assert c.num_cached_tokens == 9
    # c's end (10 tokens) keeps the prompt snapshot at 8 on its own chain and replaces a's final
    # state at 9, which it extends (the next turn of the conversation hits at 10)
    assert [(s.depth, s.final) for s in snaps.entries.values()] == [(8, False), (10, True)]
    (d,) = add_prompt(sched, "d", [100 + i for i in range(9)], max_tokens=2)
    step(sched)  # d's snapshot at 8 evicts the least recently used one: a's at 8 (not on d's chain)
    assert {(s.anchor, s.depth) for s in snaps.entries.values()} == {(c.block_keys[1], 10), (d.block_keys[1], 8)}
    run_to_end(sched)  # d's end may evict c's final state (another chain's)
    assert {(s.anchor, s.depth) for s in snaps.entries.values()} == {(d.block_keys[1], 8), (d.block_keys[1], 10)}


def test_a_finish_is_not_snapshotted_when_only_its_own_prompt_snapshots_could_go():
    sched = make_scheduler(num_snapshots=1, block_size=4)
    (a,) = add(sched, "a", 9, max_tokens=2)  # its prompt snapshot at 8 fills the pool
    run_to_end(sched)
    assert [(s.depth, s.final) for s in sched.cache.snapshots.entries.values()] == [(8, False)]


def test_two_snapshots_in_one_step_never_share_a_row():
    sched = make_scheduler(num_snapshots=1, block_size=4)
    a = add_prompt(sched, "a", [10 + i for i in range(8)], max_tokens=1)[0]
    b = add_prompt(sched, "b", [50 + i for i in range(8)], max_tokens=1)[0]
    batch = sched.schedule()  # both cross their snapshot point (4) inside their chunk
    assert batch.plan.num_new_tokens.tolist() == [8, 8]
    assert len(batch.plan.captures) == 1 and len(sched.cache.snapshots) == 1  # the second had no free row
    sched.update(batch, [7] * len(batch.sample_requests))
    run_to_end(sched)
    assert a.is_finished and b.is_finished


def test_caching_off_keys_nothing():
    sched = make_scheduler(block_size=4)  # num_snapshots=0
    (a,) = add(sched, "a", 10, max_tokens=3)
    batch, _ = step(sched)
    assert batch.plan.num_new_tokens.tolist() == [10]
    run_to_end(sched)
    (b,) = add_prompt(sched, "b", a.token_ids + [1])
    run_to_end(sched)
    assert b.num_cached_tokens == 0 and not sched.cache.block_pool.by_key and not sched.cache.block_pool.cached


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_with_shared_prefixes_keeps_invariants(seed):
    """Prompts that extend earlier prompts and answers, n in 1..3, aborts, stop tokens, preemption
    under a small block pool and a small snapshot pool: the invariants hold after every step, no
    state row or KV block is written twice by one step's copies, hits happen, and at the end
    every block is free or cached and every slot is free."""
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=24, max_num_seqs=5, num_slots=5,
                           num_snapshots=4)
    texts: list[list[int]] = [[10 + i for i in range(6)]]
    live, seqs = [], []
    for i in range(300):
        if rng.random() < 0.3:
            base = rng.choice(texts)
            base = base if len(base) < 32 and rng.random() < 0.5 else base[: rng.randint(1, 40)]  # a whole text, or a part
            prompt = (base + [rng.randrange(3, 50) for _ in range(rng.randint(1, 9))])[:40]
            group = add_prompt(sched, f"r{i}", prompt, max_tokens=rng.randint(1, 12), n=rng.randint(1, 3))
            seqs += group
            live.append(f"r{i}")
        if live and rng.random() < 0.05:
            sched.abort(live.pop(rng.randrange(len(live))), None if rng.random() < 0.5 else [rng.randrange(3)])
            sched.check_invariants()
        batch = sched.schedule()
        plan = batch.plan
        before, after = plan.slot_copies_before[:, 1].tolist(), plan.slot_copies[:, 1].tolist()
        assert len(set(before)) == len(before) and len(set(after)) == len(after)
        assert not set(before) & set(after)
        assert len(set(plan.block_copies_before[:, 1].tolist())) == len(plan.block_copies_before)
        sched.update(batch, [EOS if rng.random() < 0.1 else rng.randrange(3, 50) for _ in batch.sample_requests])
        sched.check_invariants()
        texts += [s.token_ids for s in reversed(seqs) if s.is_finished and s.token_ids not in texts][:2]
    run_to_end(sched)
    assert num_free(sched) == (24, 5)
    assert sched.num_preemptions_total > 0 and sched.cache.hits_total > 0
    assert np.all([s.num_cached_tokens < s.num_prompt_tokens for s in seqs])


def test_a_shared_prefix_is_snapshotted_where_the_second_prompt_leaves_it():
    """prefix_repetition: prompts = one shared prefix + their own suffixes. The first computes the
    prefix; the second finds its blocks cached but no snapshot there, so it snapshots the state
    where it leaves them (inside its chunk); from the third on, every prompt hits at the prefix and
    feeds the rest of its prompt in one step."""
    sched = make_scheduler(num_snapshots=8, block_size=4)
    prefix = [10 + i for i in range(12)]
    suffixes = [[100 + 10 * k + i for i in range(7)] for k in range(4)]
    seqs, cuts = [], []
    for k in range(4):  # one after the other
        seqs += add_prompt(sched, f"p{k}", prefix + suffixes[k], max_tokens=1)
        while not seqs[k].is_finished:
            batch, _ = step(sched)
            if seqs[k] in batch.requests:
                cuts.append((k, int(batch.plan.num_new_tokens[batch.requests.index(seqs[k])])))
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 12, 12]
    assert cuts == [(0, 19), (1, 19), (2, 7), (3, 7)]  # p0, p1 whole (snapshots captured inside), then hits at 12


def test_multi_turn_conversations_reach_their_first_token_in_one_step_from_turn_one():
    """The bench's multi_turn shape: conversations sharing a system prompt, each turn resending its
    history with the previous answer, while the other conversations decode. From turn 1 on, every
    prompt resumes at its previous answer's final state and feeds the rest (the answer's last token
    and the new user message) in the step that admits it, which samples its first token: exactly
    one step, with no snapshot cut; and every final state survives the small snapshot pool."""
    num_conversations, turns = 4, 5
    sched = make_scheduler(num_snapshots=num_conversations + 2, block_size=4, num_blocks=96,
                           max_num_batched_tokens=64, max_prefill_tokens_while_decoding=32)
    rng = random.Random(0)
    system = [10 + i for i in range(22)]
    sent: dict[tuple[int, int], tuple[Request, int]] = {}  # (conversation, turn) -> (sequence, step it was added)
    steps_to_first_token: dict[tuple[int, int], int] = {}
    n = 0

    def send(c: int, turn: int, history: list[int]) -> None:
        prompt = history + [rng.randrange(3, 50) for _ in range(5)]  # the user's next message
        (seq,) = add_prompt(sched, f"c{c}t{turn}", prompt, max_tokens=3 + c)  # staggered: others decode meanwhile
        sent[(c, turn)] = (seq, n)

    for c in range(num_conversations):
        send(c, 0, system)
    while sched.has_unfinished():
        step(sched)
        n += 1
        for (c, turn), (seq, added) in list(sent.items()):
            if seq.num_output_tokens and (c, turn) not in steps_to_first_token:
                steps_to_first_token[(c, turn)] = n - added
            if seq.is_finished and turn + 1 < turns and (c, turn + 1) not in sent:
                send(c, turn + 1, seq.token_ids)
    later = [(c, t) for c in range(num_conversations) for t in range(1, turns)]
    previous = {(c, t): sent[(c, t - 1)][0] for c, t in later}
    assert {k: sent[k][0].num_cached_tokens for k in later} == {k: len(previous[k].token_ids) - 1 for k in later}
    assert {k: steps_to_first_token[k] for k in later} == dict.fromkeys(later, 1)


def test_a_turn_whose_history_drops_the_answer_resumes_at_the_previous_prompts_last_full_block(monkeypatch):
    """A chat template that drops the answer's reasoning (or a text that re-tokenizes differently)
    means the next prompt does not extend the answer's tokens, so the final-state snapshot never
    serves it. A turn that recomputes enough (here: anything) is snapshotted at its prompt's last
    full block inside its chunk: the next turn resumes there and still samples its first token in
    its first step."""
    monkeypatch.setattr(cache_manager, "HIT_SNAPSHOT_MIN_TOKENS", 1)
    sched = make_scheduler(num_snapshots=8, block_size=4)
    history = [10 + i for i in range(22)]
    resumed = []
    for turn in range(4):
        (seq,) = add_prompt(sched, f"t{turn}", history, max_tokens=5)
        batch, _ = step(sched)
        assert seq.num_output_tokens == 1  # its first token in the step that admits it
        assert batch.plan.num_new_tokens.tolist() == [len(history) - seq.num_cached_tokens]
        resumed.append((seq.num_cached_tokens, (len(history) - 1) // 4 * 4))
        run_to_end(sched)
        history = history + [60 + turn, 61, 62] + [70 + 3 * turn + i for i in range(6)]  # not the answer (7s)
    # each turn resumed at the previous one's last full block (the first at nothing)
    assert [cached for cached, _ in resumed] == [0] + [boundary for _, boundary in resumed[:-1]]


def test_a_hit_takes_prompt_snapshots_only_far_enough_past_where_it_resumed(monkeypatch):
    """A capture costs its step host time, so a hit snapshots its last full block (or where it
    leaves the cached blocks) only HIT_SNAPSHOT_MIN_TOKENS or more past the snapshot it resumed
    from; a miss always does."""
    monkeypatch.setattr(cache_manager, "HIT_SNAPSHOT_MIN_TOKENS", 12)
    sched = make_scheduler(num_snapshots=8, block_size=4)
    (a,) = add_prompt(sched, "a", [10 + i for i in range(10)], max_tokens=1)
    batch, _ = step(sched)
    assert batch.plan.captures[:, 2].tolist() == [8]  # a miss: its last full block
    (b,) = add_prompt(sched, "b", a.token_ids[:9] + [40 + i for i in range(10)], max_tokens=1)  # resumes at 8
    batch, _ = step(sched)
    assert b.num_cached_tokens == 8 and b.snapshot_points == () and not len(batch.plan.captures)  # 16 - 8 < 12
    (c,) = add_prompt(sched, "c", a.token_ids[:9] + [70 + i for i in range(14)], max_tokens=1)  # resumes at 8
    batch, _ = step(sched)
    assert c.num_cached_tokens == 8 and batch.plan.captures[:, 2].tolist() == [20]  # 20 - 8 = 12: snapshotted
    run_to_end(sched)
    (d,) = add_prompt(sched, "d", c.token_ids[:21] + [90, 91, 92, 93], max_tokens=1)  # resumes at 20
    batch, _ = step(sched)  # its last full block ends at 24: 4 past where it resumed, no snapshot
    assert d.num_cached_tokens == 20 and d.snapshot_points == () and not len(batch.plan.captures)
