"""Test-wide settings, applied before any test module imports torch kernels.

- One CPU thread: the tiny model's ops gain nothing from threads, and on a 2-core CI box the test
  process, the engine process and a server process would otherwise fight over cores (steps up to
  60x slower). Child processes inherit OMP_NUM_THREADS.
- Without a GPU, Triton kernels (where triton is installed) run in Triton's interpreter. The flag
  must be set before any `@triton.jit` function is defined, so it lives here.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
