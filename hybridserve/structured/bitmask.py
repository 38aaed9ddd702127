"""Token bitmasks of one step: filled on the CPU (while the forward runs), applied on the device.

Bit t % 32 of word t // 32 is 1 where token t may follow. Only rows whose sequence has a grammar get
a row; llguidance fills them in parallel on its own threads (outside the GIL).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import llguidance
import numpy as np
import torch

from hybridserve.structured.matcher import SequenceMatcher

_executor: llguidance.LLExecutor | None = None


class StepBitmasks:
    def __init__(self, rows: list[int], masks: torch.Tensor):
        self.rows = rows  # the batch rows that have a grammar, ascending
        self.masks = masks  # [G, ceil(V / 32)] int32, host (pinned when the device is a GPU)

    def allows(self, row: int, token_id: int) -> bool:
        """Whether batch row `row` (one of `rows`) may take `token_id` next."""
        k = self.rows.index(row)
        return bool((int(self.masks[k, token_id // 32]) >> (token_id % 32)) & 1)

    def defer_forbidden(self, forced: np.ndarray) -> None:
        """Forced tokens (thinking budget; [R] int64, -1 for none) that a row's grammar does not allow
        yet wait for a later step, in place: `</think>` after half a UTF-8 character would break it."""
        for row in self.rows:
            if forced[row] >= 0 and not self.allows(row, int(forced[row])):
                forced[row] = -1

    def part(self, start: int, stop: int) -> StepBitmasks | None:
        """The masks of batch rows start..stop-1, re-indexed from 0 (None when none has a grammar):
        the sampler runs a big step a bounded number of rows at a time."""
        lo, hi = bisect.bisect_left(self.rows, start), bisect.bisect_left(self.rows, stop)
        if lo == hi:
            return None
        return StepBitmasks([r - start for r in self.rows[lo:hi]], self.masks[lo:hi])

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [G] int64, masks [G, W] int32) on the device; the copies do not block."""
        rows = torch.tensor(self.rows, dtype=torch.int64, pin_memory=self.masks.is_pinned())
        return rows.to(device, non_blocking=True), self.masks.to(device, non_blocking=True)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmasks(matchers: Sequence[SequenceMatcher | None], device: torch.device) -> StepBitmasks | None:
    """The next-token masks of the rows that have a matcher (pinned for a GPU `device`), or None
    when no row has one."""
    global _executor
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    if _executor is None:
        _executor = llguidance.LLExecutor()
    width = bitmask_width(matchers[rows[0]].vocab_size)
    masks = torch.empty((len(rows), width), dtype=torch.int32, pin_memory=device.type == "cuda")
    _executor.unsafe_compute_mask_ptr([(matchers[i].llmatcher, k) for k, i in enumerate(rows)],
                                      masks.data_ptr(), width * 4, len(rows))
    return StepBitmasks(rows, masks)
