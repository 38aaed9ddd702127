"""Run the Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1), small shapes.

Only where triton is installed and no GPU is present (on a GPU, tests/gpu runs the same cases
compiled). Two interpreter shortcomings are patched so it computes what the GPU computes:
- its scalar-to-int conversion calls int() on a 1-element array, which numpy >= 2.4 rejects
  (`range(tensor, ...)` loops); it uses .item() instead;
- it casts float32 to bfloat16 by truncation; the GPU rounds to nearest even, as torch does;
- its tl.dot multiplies bfloat16 operands as raw uint16 bits; they are widened to float32 first.
Kernels never do arithmetic in bfloat16 (they upcast first), which the interpreter also gets wrong.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None
    if interpreter is not None:
        _orig_patch = interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = _patch_lang_tensor

        import numpy as np
        import triton.language as tl

        _orig_cast = interpreter.InterpreterBuilder.cast_impl

        def _cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
                return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
            return _orig_cast(self, src, dst_type)

        interpreter.InterpreterBuilder.cast_impl = _cast_impl

        _orig_dot = interpreter.InterpreterBuilder.create_dot

        def _widen(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return _orig_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

        interpreter.InterpreterBuilder.create_dot = _create_dot


@pytest.fixture
def device():
    return "cpu"


@pytest.fixture
def big():
    return False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
