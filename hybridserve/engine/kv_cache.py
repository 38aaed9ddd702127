"""KVCache: which paged KV blocks of the attention layers each request owns (bookkeeping only).

The memory itself is `HybridCache.kv`; this class hands out block ids. A request owning
`block_ids` keeps its token at position p in block `block_ids[p // block_size]`, offset
`p % block_size`. Invariant: every block id is either in the free list or owned by exactly one
request. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque

from hybridserve.engine.request import Request


class KVCache:
    """Free list of KV blocks; grows a request's block table on demand."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow `request.block_ids` to hold `num_tokens` tokens; all or nothing."""
        need = self.blocks_for(num_tokens) - len(request.block_ids)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            request.block_ids.append(self.free_blocks.popleft())
        return True

    def free(self, request: Request) -> None:
        self.free_blocks.extend(request.block_ids)
        request.block_ids = []
