"""EngineStats: the engine's gauges and counters, sent with every step's outputs.

Built by `EngineCore.stats()`; read by the API process (`EngineClient.stats()`, Prometheus metrics)
as last-known values, so reading them never waits on the engine.
"""

from __future__ import annotations

from bisect import bisect_left

import msgspec

ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # vLLM's


class IterationTokens:
    """Tokens per engine step (prompt + generated) as histogram counts, kept by the engine core."""

    def __init__(self) -> None:
        self.counts = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.sum = 0

    def observe(self, tokens: int) -> None:
        self.counts[bisect_left(ITERATION_TOKEN_BUCKETS, tokens)] += 1
        self.sum += tokens


class EngineStats(msgspec.Struct, array_like=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1, blocks in use / blocks
    state_slot_usage: float = 0.0  # 0..1, slots in use / slots
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_free_blocks: int = 0
    num_free_slots: int = 0
    num_blocks: int = 0
    num_slots: int = 0
    iteration_tokens_counts: list[int] = msgspec.field(default_factory=list)  # per ITERATION_TOKEN_BUCKETS, +Inf
    iteration_tokens_sum: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens of admitted requests (first admissions)
    prefix_cache_hits_total: int = 0  # of those, tokens resumed from the prefix cache
    num_snapshots: int = 0  # Mamba state snapshots the prefix cache holds
