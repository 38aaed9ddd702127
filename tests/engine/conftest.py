"""Shared fixtures: the tiny preset in float32 on CPU, and cache budgets of an exact size."""

from __future__ import annotations

import pytest
import torch

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.engine_core import EngineCore
from hybridserve.model.cache import HybridCache
from hybridserve.model.loader import load_model

# The tiny model's ops are far too small to gain from threads; on a busy 2-core CI box extra
# OpenMP threads only fight each other (60x slower steps measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.from_hf("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return load_model(tiny_config, load_format="dummy", dtype=torch.float32, device="cpu")


def cache_bytes(config: ModelConfig, num_slots: int, num_blocks: int, block_size: int = 16, num_snapshots: int = 0) -> int:
    """A cpu_cache_bytes that yields exactly this many slots and blocks (plus the padding pair and
    the prefix cache's snapshot rows)."""
    slot = HybridCache.bytes_per_slot(config, torch.float32, torch.float32)
    block = HybridCache.bytes_per_block(config, block_size, torch.float32)
    return (num_slots + 1 + num_snapshots) * slot + (num_blocks + 1) * block


@pytest.fixture
def make_core(tiny_config, tiny_model):
    """EngineCore factory over the shared tiny model: make_core(num_blocks=..., max_num_seqs=..., ...)
    (prefix caching on, as by default, unless enable_prefix_caching=False; model: another model of
    the tiny preset's shape)."""

    def make(num_blocks: int = 256, max_num_seqs: int = 32, model=None, **fields) -> EngineCore:
        fields.setdefault("max_model_len", 256)
        snapshots = fields.get("prefix_cache_snapshots", EngineConfig.prefix_cache_snapshots)
        snapshots = snapshots if fields.get("enable_prefix_caching", True) else 0
        config = EngineConfig(
            model="tiny", device="cpu", max_num_seqs=max_num_seqs, num_kv_blocks=num_blocks,
            cpu_cache_bytes=cache_bytes(tiny_config, max_num_seqs, num_blocks, num_snapshots=snapshots), **fields,
        )
        core = EngineCore(config, tiny_config, model=model or tiny_model)
        assert (core.layout.num_slots, core.layout.num_blocks) == (max_num_seqs, num_blocks)
        return core

    return make
