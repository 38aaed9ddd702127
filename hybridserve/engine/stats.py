"""EngineStats: the engine's gauges and counters, sent with every step's outputs.

Built by `EngineCore.stats()`; read by the API process (`EngineClient.stats()`, Prometheus metrics)
as last-known values, so reading them never waits on the engine.
"""

from __future__ import annotations

import msgspec


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
