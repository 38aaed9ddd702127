"""The kernel cases of tests/gpu/kernel_cases.py and ssm_cases.py on small shapes, on the CPU through
Triton's interpreter. Skipped without triton (CI) and on machines with a GPU (tests/gpu covers those)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/gpu runs these cases compiled", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))

from kernel_cases import *  # noqa: E402,F401,F403
from ssm_cases import *  # noqa: E402,F401,F403
