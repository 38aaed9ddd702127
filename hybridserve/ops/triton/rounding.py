"""Stochastic rounding of a Mamba SSM state to its 16-bit cache dtype, inside the state kernels: the
twin of `hybridserve/ops/reference/rounding.py` (same hash, same bits; see there for the method).

A kernel computes the per-sequence key once (`_state_key`) and calls `_store_state` for its state
tile: one 32-bit hash per element, a few integer operations next to a memory-bound update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.sampling import _mix32


@triton.jit
def _state_key(seed, position):
    """The reference's per-state key from the seed (int in [0, 2^31)) and the state's position."""
    return _mix32(_mix32(seed.to(tl.uint32) ^ 0x5BD1E995) ^ position.to(tl.uint32))


@triton.jit
def _round_stochastic(x, bits, OUT: tl.constexpr):
    """float32 x to OUT (bfloat16 or float16) with the random uint32 `bits`, as the reference does."""
    if OUT == tl.bfloat16:
        xi = x.to(tl.uint32, bitcast=True)
        finite = (xi >> 23 & 0xFF) != 0xFF
        xi = tl.where(finite, xi + (bits & 0xFFFF), xi)
        return (xi >> 16 << 16).to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: low bits are zero
    else:
        xi = x.to(tl.int32, bitcast=True)
        exp = tl.maximum((xi >> 23 & 0xFF) - 127, -14)
        ulp = ((exp + 117) << 23).to(tl.float32, bitcast=True)
        y = tl.abs(x) + (bits & 0x1FFF).to(tl.float32) * (1.0 / 8192.0) * ulp
        r = y.to(tl.float16)
        down = (r.to(tl.int16, bitcast=True) - 1).to(tl.int16).to(tl.float16, bitcast=True)
        r = tl.where(r.to(tl.float32) > y, down, r)  # toward zero
        sign = (xi.to(tl.uint32, bitcast=True) >> 16 & 0x8000).to(tl.uint16)  # x's sign (-0.0 stays -0.0)
        return (r.to(tl.uint16, bitcast=True) | sign).to(tl.float16, bitcast=True)


@triton.jit
def _store_state(ptrs, mask, state, key, idx, SR: tl.constexpr):
    """Store a float32 state tile in the cache's dtype; stochastically when SR (a 16-bit cache),
    with the element's bits from (key, idx = its flat index in the slot's [H, P, N] state)."""
    out_ty = ptrs.dtype.element_ty
    if SR:
        tl.store(ptrs, _round_stochastic(state, _mix32(key ^ idx.to(tl.uint32)), out_ty), mask=mask)
    else:
        tl.store(ptrs, state.to(out_ty), mask=mask)


def use_stochastic_rounding(state_dtype, state_seed: int | None) -> bool:
    """Whether a state write rounds stochastically (16-bit state and a seed)."""
    assert state_seed is None or 0 <= state_seed < 2**31, "state_seed must be in [0, 2^31)"
    return state_seed is not None and state_dtype in (torch.bfloat16, torch.float16)
