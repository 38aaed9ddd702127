"""Op backends. `get_ops(device)` picks once: Triton kernels on a CUDA device, the pure-PyTorch
reference elsewhere. Both expose the same functions (see `hybridserve/ops/reference/__init__.py`)."""

from __future__ import annotations

import types

import torch


def get_ops(device: torch.device | str) -> types.ModuleType:
    if torch.device(device).type == "cuda":
        from hybridserve.ops import triton as triton_ops

        return triton_ops
    from hybridserve.ops import reference

    return reference
