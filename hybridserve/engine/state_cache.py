"""StateCache: which Mamba state slot (conv + SSM state of every Mamba layer) each live request owns.

The memory itself is `HybridCache.conv_state` / `ssm_state`; this class hands out slot ids, one per
running request. A Mamba state cannot be rebuilt from KV pages, so a request that loses its slot
(preemption) recomputes from its first token. Invariant: every slot is free or owned by exactly one
running request. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque

from hybridserve.engine.request import Request


class StateCache:
    """Free list of Mamba state slots."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free_slots: deque[int] = deque(range(num_slots))

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_slots / self.num_slots if self.num_slots else 0.0

    def allocate(self, request: Request) -> bool:
        if request.state_slot is not None:
            return True
        if not self.free_slots:
            return False
        request.state_slot = self.free_slots.popleft()
        return True

    def free(self, request: Request) -> None:
        if request.state_slot is not None:
            self.free_slots.append(request.state_slot)
            request.state_slot = None
