"""CacheManager: the one place cache policy lives — which KV blocks and Mamba state slot each
sequence owns, who may be admitted, where prefix-cache snapshots are taken, and how n > 1
siblings fork.

`CacheLayout` is the frozen result of the runner's memory plan (block size, block and slot counts,
dtypes, context length). It travels to the API side once, and it holds THE admission rule
(`check_request`), so the engine and the client cannot disagree about what fits.

Pools: `BlockPool` hands out KV block ids with reference counts (a block shared by n > 1 siblings
has one reference per owner; it returns to the free list when the last owner lets go). `SlotPool`
hands out Mamba state slots, one per running sequence. Glossary: a "slot" is a Mamba state row
(and, by the same index, the sequence's block-table row and token-buffer row); the flat KV
position of a token is its `slot_mapping` entry, which is something else.

The manager also records what the device must do before / after the next step: block-table
entries that changed and the state and block copies of forks and of the prefix cache
(`take_step_changes`). A block shared by several owners, or keyed by its content, is never
written again: only full blocks are shared; the partial tail block of a fork or a hit is copied.

Prefix caching (on when the layout has snapshot rows): full blocks are keyed by content as they
fill and stay cached (LRU) once unreferenced; Mamba state snapshots are taken where a prompt
leaves a prefix other sequences computed, at its last full block, and at a sequence's end; a new
prompt resumes from the deepest snapshot `match` finds (docs/architecture.md, "Prefix caching").
Pure Python, no torch; the scheduler is its only caller.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from hybridserve.engine.prefix_cache import ROOT, Snapshot, SnapshotPool, content_key
from hybridserve.engine.request import Request

# A hit takes a prompt snapshot only this many tokens or more past the snapshot it resumed from (a
# miss takes them all). A capture costs its step ≈ 10-20 ms of host time (an extra SSM launch per
# Mamba layer; H100, docs/performance.md), about what recomputing 1k tokens costs a later prompt.
HIT_SNAPSHOT_MIN_TOKENS = 1024


class CacheLayout(msgspec.Struct, frozen=True, array_like=True):
    """What the caches hold, measured once at start-up by the model runner."""

    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the pool (the runner's padding block excluded)
    num_slots: int  # Mamba state slots in the pool (the padding slot excluded)
    max_model_len: int  # prompt + generated tokens of one sequence
    kv_dtype: str  # e.g. "bfloat16"
    state_dtype: str  # the SSM state's dtype, e.g. "float32"
    num_snapshots: int = 0  # Mamba state snapshot rows of the prefix cache (0: prefix caching off)

    def snapshot_row(self, index: int) -> int:
        """The state row of snapshot `index`: rows are the sequence slots, the runner's padding
        slot, then the snapshots."""
        return self.num_slots + 1 + index

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_request(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """THE admission rule: raise ValueError unless a sequence of this prompt and max_tokens
        (None: up to the context length) fits the context and, alone, the KV pool; returns the
        max_tokens to use. The last sampled token is never fed back, so it needs no KV."""
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt ({num_prompt_tokens} tokens) leaves no room to generate within the maximum "
                f"context length {self.max_model_len}"
            )
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt_tokens
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"maximum context length {self.max_model_len}"
            )
        blocks = self.blocks_for(total - 1)
        if blocks > self.num_blocks:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks, "
                f"more than the cache holds ({self.num_blocks})"
            )
        return max_tokens


class BlockPool:
    """KV block ids with reference counts. A block with no reference is either plain free or, when
    its content has a key (prefix caching), cached: kept resident in an LRU and found by its key,
    and reused (oldest first, its key dropped) only once no plain free block is left."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refcounts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.keys: list[int | None] = [None] * num_blocks  # content key of each keyed block
        self.by_key: dict[int, int] = {}  # content key -> block
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced keyed blocks, least recent first

    @property
    def num_free(self) -> int:
        """Blocks `take` can hand out: plain free ones and unreferenced cached ones."""
        return len(self.free) + len(self.cached)

    def take(self, n: int) -> list[int]:
        """n blocks, each with one reference (the caller checked `num_free`)."""
        blocks = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.cached.popitem(last=False)
                del self.by_key[self.keys[b]]
                self.keys[b] = None
            self.refcounts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refcounts[b] == 0:
                del self.cached[b]
            self.refcounts[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refcounts[b] -= 1
            if self.refcounts[b] == 0:
                if self.keys[b] is None:
                    self.free.append(b)
                else:
                    self.cached[b] = None

    def set_key(self, block: int, key: int) -> None:
        """Name a referenced block by its content, unless that content is already cached."""
        if self.keys[block] is None and key not in self.by_key:
            self.keys[block] = key
            self.by_key[key] = block

    def check_invariants(self, owners: Counter) -> None:
        """Reference counts = owners; free = unreferenced and keyless; cached = unreferenced and keyed."""
        for b in range(self.num_blocks):
            assert self.refcounts[b] == owners.get(b, 0), f"block {b}: refcount {self.refcounts[b]}, {owners.get(b, 0)} owners"
        assert len(self.free) == len(set(self.free)), "a block is free twice"
        unreferenced = {b for b in range(self.num_blocks) if self.refcounts[b] == 0}
        assert set(self.free) | set(self.cached) == unreferenced, "free + cached != unreferenced"
        assert all(self.keys[b] is None for b in self.free) and all(self.keys[b] is not None for b in self.cached)
        assert {k: b for b, k in enumerate(self.keys) if k is not None} == self.by_key, "key index out of step"


class SlotPool:
    """Mamba state slot ids; each is free or owned by one running sequence."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        return self.free.popleft()

    def release(self, slot: int) -> None:
        self.free.append(slot)


@dataclass
class StepChanges:
    """Device work the cache decisions of one schedule() imply (numpy, int64). Each copy list is
    applied as one gather-then-scatter (every source is read before any destination is written)."""

    table_updates: np.ndarray  # [K, 3] (row = slot, column, block): block_table[row, column] = block
    slot_copies_before: np.ndarray  # [C, 2] (src, dst) state rows, before the forward: snapshot saves and restores
    block_copies_before: np.ndarray  # [D, 2] (src, dst) KV blocks, before the forward: a hit's partial tail block
    slot_copies: np.ndarray  # [C, 2] (src, dst) state rows, after the forward: forks, prompt snapshots at a chunk's end
    block_copies: np.ndarray  # [D, 2] (src, dst) KV blocks, after the forward: a fork's tail block
    captures: np.ndarray  # [N, 3] (slot, row, position): prompt snapshots inside a chunk, taken by the forward

    @classmethod
    def none(cls) -> StepChanges:
        return cls(*(np.zeros((0, cols), dtype=np.int64) for cols in (3, 2, 2, 2, 2, 3)))


@dataclass
class Hit:
    """A prefix-cache match: resume from `snapshot`, sharing the full blocks it covers."""

    snapshot: Snapshot
    blocks: list[int]  # the cached full blocks of the covered tokens, in order
    tail_block: int | None  # the cached partial block after them (copied, never shared), if any


class CacheManager:
    """Admission, growth, fork, free and prefix caching over the block, slot and snapshot pools."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.block_pool = BlockPool(layout.num_blocks)
        self.slot_pool = SlotPool(layout.num_slots)
        self.snapshots = SnapshotPool(layout.num_snapshots)
        self.caching = layout.num_snapshots > 0  # prefix caching on
        self.queries_total = 0  # prompt tokens of first admissions
        self.hits_total = 0  # of those, tokens resumed from the prefix cache
        self._table_updates: list[tuple[int, int, int]] = []
        self._slot_copies_before: list[tuple[int, int]] = []
        self._block_copies_before: list[tuple[int, int]] = []
        self._slot_copies: list[tuple[int, int]] = []
        self._block_copies: list[tuple[int, int]] = []
        self._captures: list[tuple[int, int, int]] = []
        self._pending_saves: dict[int, int] = {}  # state row -> slot it is saved from before the next forward

    # ---- queries -------------------------------------------------------------------------------
    @property
    def block_usage(self) -> float:
        n = self.block_pool.num_blocks
        return 1.0 - self.block_pool.num_free / n if n else 0.0

    @property
    def slot_usage(self) -> float:
        n = self.slot_pool.num_slots
        return 1.0 - self.slot_pool.num_free / n if n else 0.0

    # ---- ownership -----------------------------------------------------------------------------
    def admit(self, request: Request, budget: int) -> int:
        """Give a waiting request a slot and the blocks for its first chunk, resuming from the prefix
        cache where it can (`num_computed_tokens` jumps to the hit's depth). All or nothing: returns
        the chunk's size, or 0 (nothing changed) when no slot or too few blocks are free."""
        # prompt_logprobs score every prompt position, so such a prompt is computed in full
        resumable = self.caching and request.prompt_logprobs is None
        hit, num_cached_blocks = self.match(request) if resumable else (None, 0)
        start = hit.snapshot.depth if hit else 0
        request.snapshot_points = self._snapshot_points(request, start, num_cached_blocks)
        n = min(request.num_tokens - start, budget)
        shared = hit.blocks if hit else []
        held = shared + ([hit.tail_block] if hit and hit.tail_block is not None else [])
        need = self.layout.blocks_for(start + n) - len(shared)
        reclaimed = sum(1 for b in held if self.block_pool.refcounts[b] == 0)  # cached blocks the hit takes out
        if self.slot_pool.num_free == 0 or need > self.block_pool.num_free - reclaimed:
            return 0
        request.state_slot = self.slot_pool.take()
        self.block_pool.share(held)  # held while `take` may evict cached blocks
        self._append_blocks(request, shared)
        fresh = self.block_pool.take(need)
        if hit:
            if hit.tail_block is not None:  # copy-on-write: the request writes the rest of that block
                self._block_copies_before.append((hit.tail_block, fresh[0]))
                self.block_pool.release([hit.tail_block])
            row = self.layout.snapshot_row(hit.snapshot.row)
            self._slot_copies_before.append((self._pending_saves.get(row, row), request.state_slot))
            self.snapshots.touch(hit.snapshot, pin=True)  # read by this step: not evicted in it
            request.num_computed_tokens = start
        self._append_blocks(request, fresh)
        if request.num_preemptions == 0:  # a first admission (a preempted request is recomputed)
            request.num_cached_tokens = start
            self.queries_total += request.num_tokens
            self.hits_total += start
        return n

    def grow(self, request: Request, num_tokens: int) -> bool:
        """Grow a running request's blocks to hold `num_tokens`; all or nothing."""
        need = self.layout.blocks_for(num_tokens) - len(request.block_ids)
        if need > self.block_pool.num_free:
            return False
        if need > 0:
            self._append_blocks(request, self.block_pool.take(need))
        return True

    def fork(self, parent: Request, child: Request) -> bool:
        """n > 1: start `child` from the parent's prompt state as it will be after this step's
        forward (the parent's prompt fully computed). The child shares the parent's full prompt
        blocks by reference, gets a copy of the partial tail block (both will write into it) and
        a copy of the parent's Mamba slot. All or nothing; False when no slot or block is free."""
        num_full, tail = divmod(parent.num_prompt_tokens, self.layout.block_size)
        need = 1 if tail else 0
        if self.slot_pool.num_free == 0 or need > self.block_pool.num_free:
            return False
        child.state_slot = self.slot_pool.take()
        shared = parent.block_ids[:num_full]
        self.block_pool.share(shared)
        self._append_blocks(child, shared)
        if tail:
            (copy,) = self.block_pool.take(1)
            self._block_copies.append((parent.block_ids[num_full], copy))
            self._append_blocks(child, [copy])
        self._slot_copies.append((parent.state_slot, child.state_slot))
        child.num_cached_tokens = parent.num_cached_tokens
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references to its blocks and return its slot."""
        self.block_pool.release(request.block_ids)
        request.block_ids = []
        if request.state_slot is not None:
            self.slot_pool.release(request.state_slot)
            request.state_slot = None

    def take_step_changes(self) -> StepChanges:
        """The table updates and copies recorded since the last call (the next step's)."""
        def arr(rows: list[tuple], cols: int) -> np.ndarray:
            return np.array(rows, dtype=np.int64).reshape(-1, cols)

        changes = StepChanges(
            table_updates=arr(self._table_updates, 3),
            slot_copies_before=arr(self._slot_copies_before, 2),
            block_copies_before=arr(self._block_copies_before, 2),
            slot_copies=arr(self._slot_copies, 2),
            block_copies=arr(self._block_copies, 2),
            captures=arr(self._captures, 3),
        )
        self._table_updates, self._slot_copies, self._block_copies, self._captures = [], [], [], []
        self._slot_copies_before, self._block_copies_before = [], []
        self._pending_saves.clear()
        self.snapshots.end_step()
        return changes

    # ---- prefix caching ------------------------------------------------------------------------
    def match(self, request: Request) -> tuple[Hit | None, int]:
        """The deepest snapshot whose tokens are a strict prefix of the request's (one token at
        least is left to feed, for its logits) and whose KV blocks are all still cached; and how
        many of the request's leading full blocks are cached (where it leaves cached content)."""
        bs = self.layout.block_size
        limit = request.num_tokens - 1
        keys = self._keys(request, limit // bs)[: limit // bs]
        blocks = []
        for key in keys:
            block = self.block_pool.by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        tokens = request.token_ids
        for j in range(len(blocks), 0, -1):
            for snap in self.snapshots.anchored_at(keys[j - 1]):
                if snap.depth > limit or tokens[j * bs : j * bs + len(snap.tail)] != list(snap.tail):
                    continue
                tail_block = self.block_pool.by_key.get(snap.key) if snap.tail else None
                if snap.tail and tail_block is None:  # its partial block was evicted: useless now
                    if snap.row not in self.snapshots.pinned_rows:
                        self.snapshots.drop(snap)
                    continue
                return Hit(snap, blocks[:j], tail_block), len(blocks)
        return None, len(blocks)

    def computed(self, request: Request, n: int) -> None:
        """The step being planned feeds the request's next `n` tokens: key the blocks it fills,
        and snapshot the state at the prompt's snapshot points it reaches."""
        if not self.caching:
            return
        bs = self.layout.block_size
        start, end = request.num_computed_tokens, request.num_computed_tokens + n
        # a block is keyed once its tokens are known on the host: with a sampled token still in
        # flight (async scheduling), the block it completes is keyed by the next step, hence "- 1"
        first, last = max(0, start // bs - 1), min(end, len(request.token_ids)) // bs
        if last > first:
            keys = self._keys(request, last)
            for j in range(first, last):
                self.block_pool.set_key(request.block_ids[j], keys[j])
        for point in request.snapshot_points if start < request.num_prompt_tokens else ():
            if start < point <= end:  # at the chunk's end: a copy after the forward; inside it: a capture
                key = self._keys(request, point // bs)[point // bs - 1]
                self._snapshot(request, key, key, (), point, when="after" if point == end else "inside")

    def finished(self, request: Request) -> None:
        """A request ends normally: snapshot its final state (every fed token), keyed by its last
        full block and the tokens after it, and keep its partial tail block cached with it. It never
        evicts a prompt snapshot on its own chain (a shared prefix such as a system prompt, which
        serves every conversation), but may evict an earlier final state, its own included (the
        new one extends that text); skipped when only such prompt snapshots could go."""
        if not self.caching:
            return
        bs = self.layout.block_size
        depth = request.num_computed_tokens
        j = depth // bs
        if j == 0 or depth > len(request.token_ids):  # (a state over tokens the host does not know)
            return
        keys = self._keys(request, j)[:j]
        for col in range(max(0, j - 2), j):  # the blocks its last steps filled (maybe not keyed yet)
            self.block_pool.set_key(request.block_ids[col], keys[col])
        tail = tuple(request.token_ids[j * bs : depth])
        key = content_key(keys[-1], tail) if tail else keys[-1]
        chain = set(keys)

        def keep(snap: Snapshot) -> bool:  # a prompt snapshot on its own chain
            return snap.anchor in chain and not snap.final

        if self._snapshot(request, key, keys[-1], tail, depth, when="before", keep=keep) and tail:
            self.block_pool.set_key(request.block_ids[j], key)  # the partial block stays cached with it

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshots)

    def check_invariants(self, owners: Counter) -> None:
        """Block references, keys and the cached LRU (`BlockPool`), and the snapshot pool."""
        self.block_pool.check_invariants(owners)
        self.snapshots.check_invariants(self.layout.block_size)
        assert self.caching or not (self.block_pool.by_key or len(self.snapshots)), "caching off, yet things cached"

    # ---- internals -----------------------------------------------------------------------------
    def _snapshot_points(self, request: Request, start: int, num_cached_blocks: int) -> tuple[int, ...]:
        """Where a prompt admitted at `start` is snapshotted, in order: where it leaves content
        another sequence computed before (`_branch_point`: a prefix now seen twice, so the next
        prompt sharing it hits), and the end of its last full block before its last token (so the
        same prompt again, or the next turn extending it, hits; the snapshot at the sequence's end
        misses that turn when its template drops the reasoning or its text tokenizes differently).
        Both are captured inside the chunk that crosses them, at no extra step. A hit takes only
        points `HIT_SNAPSHOT_MIN_TOKENS` or more past its `start`. Empty with caching off; no point
        below one block or at or before `start`."""
        if not self.caching:
            return ()
        boundary = (request.num_prompt_tokens - 1) // self.layout.block_size * self.layout.block_size
        least = start + HIT_SNAPSHOT_MIN_TOKENS if start else 1
        return tuple(sorted({p for p in (self._branch_point(request, start, num_cached_blocks), boundary)
                             if p >= least}))

    def _branch_point(self, request: Request, start: int, num_cached_blocks: int) -> int:
        """Where a prompt resuming at `start` leaves the cached blocks, if a snapshot there is new
        (0: none): the divergence from an earlier sequence (a shared system prompt)."""
        point = num_cached_blocks * self.layout.block_size
        if point <= start or self._keys(request, num_cached_blocks)[num_cached_blocks - 1] in self.snapshots:
            return 0
        return point

    def _keys(self, request: Request, num_blocks: int) -> list[int]:
        """The content keys of the request's full blocks, at least its first `num_blocks` (memoised
        on it, not copied: index it)."""
        keys, bs = request.block_keys, self.layout.block_size
        while len(keys) < num_blocks:
            j = len(keys)
            keys.append(content_key(keys[-1] if keys else ROOT, request.token_ids[j * bs : (j + 1) * bs]))
        return keys

    def _snapshot(self, request: Request, key: int, anchor: int, tail: tuple[int, ...], depth: int,
                  *, when: str, keep: Callable[[Snapshot], bool] | None = None) -> bool:
        """Save the request's state after `depth` tokens into a snapshot row (evicting none to
        `keep`): copied "before" the next forward (its state is final now: a sequence's end) or
        "after" this step's forward (its chunk ends there), or captured by the forward "inside"
        its chunk. Returns whether a snapshot of `key` exists now (False: no row could be freed)."""
        existing = self.snapshots.entries.get(key)
        if existing is not None:
            self.snapshots.touch(existing)
            return True
        if not self.snapshots.has_room(keep):
            return False
        snap = self.snapshots.add(key, anchor, tail, depth, final=when == "before", keep=keep)
        row, slot = self.layout.snapshot_row(snap.row), request.state_slot
        if when == "before":
            self._slot_copies_before.append((slot, row))
            self._pending_saves[row] = slot
        elif when == "after":
            self._slot_copies.append((slot, row))
        else:
            self._captures.append((slot, row, depth))
        return True

    def _append_blocks(self, request: Request, blocks: list[int]) -> None:
        start = len(request.block_ids)
        request.block_ids += blocks
        slot = request.state_slot
        self._table_updates += [(slot, start + i, b) for i, b in enumerate(blocks)]
