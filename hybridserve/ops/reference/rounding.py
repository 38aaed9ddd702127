"""Stochastic rounding of a Mamba SSM state to its 16-bit cache dtype (bfloat16 or float16).

The state is updated in float32 and rounded once per write. Round-to-nearest loses the small
per-step increments of a slowly decaying state (a value moves only when an update exceeds half a
unit in the last place), so long generations drift from the float32 state; stochastic rounding rounds
up with probability equal to the distance to the lower neighbour, which keeps every write unbiased.

The random bits are counter based: a 32-bit hash of (seed, position, element) where the seed names
the layer (and the engine's seed), the position is the sequence position the written state belongs
to (the last token it has seen) and the element is the flat index in the slot's [H, P, N] state.
So a sequence gets the same rounding whatever slot it sits in and whatever batch it shares, and a
recomputed state (preemption) is bit-identical. The hash is the sampler's `mix32`, which the Triton
twin (`ops/triton/rounding.py`) reproduces bit for bit.

- bfloat16: add 16 random bits to the float32 bit pattern, then drop the low 16 bits (carries move
  the value to the next bfloat16 exactly when the random bits exceed the dropped fraction).
- float16 (fewer exponent bits, so its own unit in the last place and subnormals): add u * ulp with
  13 random bits u in [0, 1) to |x|, round toward zero. Values beyond the float16 range saturate
  at its largest finite value.
Infinities and NaN pass through. The Triton twin gives the same bits for the same float32 input;
its float32 update math may differ from torch's in the last bit, so a kernel's state can differ
from the reference's by one 16-bit unit where that bit decides the rounding.
"""

from __future__ import annotations

import torch

from hybridserve.ops.reference.sampling import mix32

_MASK32 = 0xFFFFFFFF


def state_noise(seed: int, positions: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The random bits for writing B states: [B, *shape] int64 holding uint32 values.

    seed: int in [0, 2^31); positions: [B] (the position each state belongs to).
    """
    key = mix32(mix32(torch.tensor(seed & _MASK32, dtype=torch.int64) ^ 0x5BD1E995) ^ (positions.long() & _MASK32))
    numel = 1
    for s in shape:
        numel *= s
    idx = torch.arange(numel, device=positions.device, dtype=torch.int64).view(shape)
    return mix32(key.view(-1, *([1] * len(shape))) ^ idx)


def round_state(x: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor | None) -> torch.Tensor:
    """x (float32) in `dtype`: stochastically rounded with `noise` (from state_noise, broadcastable to
    x) when dtype is 16-bit and noise is given, else round-to-nearest."""
    if noise is None or dtype == torch.float32:
        return x.to(dtype)
    x = x.float()
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    if dtype == torch.bfloat16:
        finite = (bits & 0x7F800000) != 0x7F800000
        bits = torch.where(finite, bits + (noise & 0xFFFF), bits) & 0xFFFF0000
        return _as_float32(bits).to(torch.bfloat16)  # exact: the low 16 bits are zero
    assert dtype == torch.float16, f"no stochastic rounding to {dtype}"
    exp = (((bits >> 23) & 0xFF) - 127).clamp_min(-14)  # float16's exponent range (subnormals below)
    ulp = _as_float32((exp + 127 - 10) << 23)
    y = x.abs() + (noise & 0x1FFF).float() * (1.0 / 8192) * ulp
    r = y.to(torch.float16)
    r = torch.where(r.float() > y, (r.view(torch.int16) - 1).view(torch.float16), r)  # toward zero
    return torch.where(x.view(torch.int32) < 0, -r, r)


def _as_float32(bits: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) reinterpreted as float32 bit patterns."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
