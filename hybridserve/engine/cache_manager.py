"""CacheManager: the one place cache policy lives — which KV blocks and Mamba state slot each
sequence owns, who may be admitted, how a prompt chunk is cut, and how n > 1 siblings fork.

`CacheLayout` is the frozen result of the runner's memory plan (block size, block and slot counts,
dtypes, context length). It travels to the API side once, and it holds THE admission rule
(`check_request`), so the engine and the client cannot disagree about what fits.

Pools: `BlockPool` hands out KV block ids with reference counts (a block shared by n > 1 siblings
has one reference per owner; it returns to the free list when the last owner lets go). `SlotPool`
hands out Mamba state slots, one per running sequence. Glossary: a "slot" is a Mamba state row
(and, by the same index, the sequence's block-table row and token-buffer row); the flat KV
position of a token is its `slot_mapping` entry, which is something else.

The manager also records what the device must do before / after the next step: block-table
entries that changed and the state and block copies of forks (`take_step_changes`). A block
shared by several owners is never written again: only full prompt blocks are shared; the partial
tail block of a fork is copied. Prefix caching will add content hashes, `match` and state
snapshots here. Pure Python, no torch; the scheduler is its only caller.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import msgspec
import numpy as np

from hybridserve.engine.request import Request


class CacheLayout(msgspec.Struct, frozen=True, array_like=True):
    """What the caches hold, measured once at start-up by the model runner."""

    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the pool (the runner's padding block excluded)
    num_slots: int  # Mamba state slots in the pool (the padding slot excluded)
    max_model_len: int  # prompt + generated tokens of one sequence
    kv_dtype: str  # e.g. "bfloat16"
    state_dtype: str  # the SSM state's dtype, e.g. "float32"

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
    """KV block ids with reference counts; a block is free exactly when its count is 0."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refcounts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        """n free blocks, each with one reference (the caller checked `num_free`)."""
        blocks = [self.free.popleft() for _ in range(n)]
        for b in blocks:
            self.refcounts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refcounts[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refcounts[b] -= 1
            if self.refcounts[b] == 0:
                self.free.append(b)


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
    """Device work the cache decisions of one schedule() imply (numpy, int64)."""

    table_updates: np.ndarray  # [K, 3] (row = slot, column, block): block_table[row, column] = block
    slot_copies: np.ndarray  # [C, 2] (src, dst) Mamba state slots, copied after the step's forward
    block_copies: np.ndarray  # [D, 2] (src, dst) KV blocks, copied after the step's forward


class CacheManager:
    """Admission, growth, fork and free over one BlockPool and one SlotPool."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.block_pool = BlockPool(layout.num_blocks)
        self.slot_pool = SlotPool(layout.num_slots)
        self._table_updates: list[tuple[int, int, int]] = []
        self._slot_copies: list[tuple[int, int]] = []
        self._block_copies: list[tuple[int, int]] = []

    # ---- queries -------------------------------------------------------------------------------
    @property
    def block_usage(self) -> float:
        n = self.block_pool.num_blocks
        return 1.0 - self.block_pool.num_free / n if n else 0.0

    @property
    def slot_usage(self) -> float:
        n = self.slot_pool.num_slots
        return 1.0 - self.slot_pool.num_free / n if n else 0.0

    def chunk_size(self, request: Request, budget: int) -> int:
        """How many of the request's pending tokens to feed this step, within `budget` (> 0)."""
        return min(request.num_pending_tokens, budget)

    # ---- ownership -----------------------------------------------------------------------------
    def admit(self, request: Request, num_tokens: int) -> bool:
        """Give a waiting request a slot and the blocks for its first `num_tokens`; all or nothing."""
        need = self.layout.blocks_for(num_tokens)
        if self.slot_pool.num_free == 0 or need > self.block_pool.num_free:
            return False
        request.state_slot = self.slot_pool.take()
        self._append_blocks(request, self.block_pool.take(need))
        return True

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
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references to its blocks and return its slot."""
        self.block_pool.release(request.block_ids)
        request.block_ids = []
        if request.state_slot is not None:
            self.slot_pool.release(request.state_slot)
            request.state_slot = None

    def take_step_changes(self) -> StepChanges:
        """The table updates and copies recorded since the last call."""
        changes = StepChanges(
            table_updates=np.array(self._table_updates, dtype=np.int64).reshape(-1, 3),
            slot_copies=np.array(self._slot_copies, dtype=np.int64).reshape(-1, 2),
            block_copies=np.array(self._block_copies, dtype=np.int64).reshape(-1, 2),
        )
        self._table_updates, self._slot_copies, self._block_copies = [], [], []
        return changes

    # ---- internals -----------------------------------------------------------------------------
    def _append_blocks(self, request: Request, blocks: list[int]) -> None:
        start = len(request.block_ids)
        request.block_ids += blocks
        slot = request.state_slot
        self._table_updates += [(slot, start + i, b) for i, b in enumerate(blocks)]
