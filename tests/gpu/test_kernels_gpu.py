"""Every Triton kernel against its reference on the GPU, at the real model's shapes (cases in
kernel_cases.py and ssm_cases.py). Skipped without triton or CUDA."""

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from kernel_cases import *  # noqa: E402,F401,F403
from ssm_cases import *  # noqa: E402,F401,F403
