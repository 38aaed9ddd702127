"""Launch metadata that every layer of one model forward derives alike, computed once.

Each Mamba and attention layer of a prefill step turns the batch's `cu_seqlens`, `seq_lens` and
flags into the same int32 views and chunk / tile maps: a handful of tiny launches per layer, which
on a host-bound prefill step (a few hundred tokens) add up to milliseconds. Inside `forward_scope()`
(the model's forward), `per_batch(name, tensors, fn)` keeps `fn()`'s result for the rest of the
forward, keyed by the identity of the tensors it reads (held, so no identity is reused meanwhile).
Outside a forward (kernel tests, bench/ops.py) it always calls `fn`. So a result never outlives its
batch, nor crosses into or out of a CUDA-graph capture (a graph records its metadata launches like
any other).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_results: dict[tuple, tuple[tuple[torch.Tensor, ...], Any]] | None = None  # None: no forward running


@contextmanager
def forward_scope() -> Iterator[None]:
    """One model forward: its layers may share launch metadata derived from the batch (the Triton
    ops do; the reference has none)."""
    global _results
    _results = {}
    try:
        yield
    finally:
        _results = None


def per_batch(name: str, tensors: tuple[torch.Tensor, ...], fn: Callable[[], Any]) -> Any:
    if _results is None:
        return fn()
    key = (name, *(id(t) for t in tensors))
    hit = _results.get(key)
    if hit is None:
        hit = _results[key] = (tensors, fn())
    return hit[1]
