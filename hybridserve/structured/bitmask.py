"""Token bitmasks of one step: filled on the CPU (while the forward runs), applied on the device.

Bit t of row r (word t // 32, bit t % 32) is 1 where token t may follow. Only rows whose sequence
has a grammar get a row; llguidance fills them in parallel on its own threads (outside the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import torch

from hybridserve.structured.matcher import SequenceMatcher

_executor: llguidance.LLExecutor | None = None


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmasks(matchers: Sequence[SequenceMatcher | None], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row indices [G] int64, bitmasks [G, ceil(V / 32)] int32) on `device` for the rows that
    have a matcher, or None when none has one. The host->device copies do not block."""
    global _executor
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    if _executor is None:
        _executor = llguidance.LLExecutor()
    width = bitmask_width(matchers[rows[0]].vocab_size)
    pin = device.type == "cuda"
    masks = torch.empty((len(rows), width), dtype=torch.int32, pin_memory=pin)
    _executor.unsafe_compute_mask_ptr([(matchers[i].llmatcher, k) for k, i in enumerate(rows)],
                                      masks.data_ptr(), width * 4, len(rows))
    index = torch.tensor(rows, dtype=torch.int64, pin_memory=pin)
    return index.to(device, non_blocking=True), masks.to(device, non_blocking=True)
