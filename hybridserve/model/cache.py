"""HybridCache: the device tensors that carry state between model steps.

Only attention layers keep keys/values (paged); Mamba layers keep a fixed-size state per live
sequence (one slot each). The engine decides which pages and slot a sequence owns; this class only
holds the memory and says how big things are.

Layout (letters: S slots, NB pages, BS page size, K conv kernel, C conv channels, H Mamba heads,
P head dim, N state size, Hkv kv heads, D head dim):
  conv_state [L_mamba, S, K, C]          model dtype; ring of the last K raw (pre-conv) xBC rows
  ssm_state  [L_mamba, S, H, P, N]       float32 by default (bfloat16 / float16 allowed)
  kv         [L_attn, 2, NB, BS, Hkv, D] model dtype, or float8_e4m3fn (--kv-cache-dtype fp8: the
                                        layers' kv_scale dequantize); [:, 0] keys, [:, 1] values

A 16-bit SSM state is rounded on every write (decode step, prefill's final state): stochastically
when `rounding_seed` is set (each Mamba layer passes its ops `state_seed(layer)`), else to nearest.
Slot copies keep the dtype and so are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.config import ModelConfig


@dataclass
class HybridCache:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    kv: torch.Tensor
    block_size: int
    rounding_seed: int | None = None  # stochastic rounding of a 16-bit SSM state; None: to nearest

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_slots: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        ssm_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_dtype: torch.dtype | None = None,
        rounding_seed: int | None = None,
    ) -> HybridCache:
        """kv_dtype: the KV pages' dtype (default: `dtype`)."""
        n_mamba = len(config.layers_of("M"))
        n_attn = len(config.layers_of("*"))
        conv = torch.zeros(n_mamba, num_slots, config.conv_kernel, config.conv_dim, dtype=dtype, device=device)
        ssm = torch.zeros(
            n_mamba, num_slots, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size,
            dtype=ssm_dtype, device=device,
        )
        kv = torch.zeros(
            n_attn, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim,
            dtype=kv_dtype or dtype, device=device,
        )
        return cls(conv_state=conv, ssm_state=ssm, kv=kv, block_size=block_size, rounding_seed=rounding_seed)

    @staticmethod
    def bytes_per_slot(config: ModelConfig, dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
        """Mamba state bytes of one sequence over all Mamba layers (from `allocate` on the meta device,
        so the layout is written once)."""
        one = HybridCache.allocate(config, 1, 0, 1, dtype, ssm_dtype, device="meta")
        return one.conv_state.nbytes + one.ssm_state.nbytes

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, kv_dtype: torch.dtype) -> int:
        """KV bytes of one page over all attention layers (1 byte per element for an fp8 cache)."""
        return HybridCache.allocate(config, 0, 1, block_size, kv_dtype, device="meta").kv.nbytes

    def state_seed(self, layer: int) -> int | None:
        """The SSM-state rounding seed of one Mamba layer (each layer draws its own bits), or None."""
        if self.rounding_seed is None or self.ssm_state.dtype == torch.float32:
            return None
        return (self.rounding_seed * 1_000_003 + layer) % 2**31

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Mamba states of rows src [C] int64 into rows dst [C] (forks, prefix-cache snapshots); every
        source is read before any destination is written. Layer by layer, so the gathered temporary
        is C rows of one layer, not C whole states (≈ 47 MiB each for Nemotron-3-Nano)."""
        for conv, ssm in zip(self.conv_state, self.ssm_state):
            conv[dst] = conv[src]
            ssm[dst] = ssm[src]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """KV pages src [D] int64 into pages dst [D] (a fork's or a prefix-cache hit's partial tail block)."""
        self.kv[:, :, dst] = self.kv[:, :, src]
