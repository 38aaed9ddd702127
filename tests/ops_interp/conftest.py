"""Run the Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1), small shapes.

Only where triton is installed and no GPU is present (on a GPU, tests/gpu runs the same cases
compiled). Two interpreter shortcomings are patched so it computes what the GPU computes:
- its scalar-to-int conversion calls int() on a 1-element array, which numpy >= 2.4 rejects
  (`range(tensor, ...)` loops); it uses .item() instead;
- it casts float32 to bfloat16 by truncation; the GPU rounds to nearest even, as torch does;
- its tl.dot multiplies bfloat16 operands as raw uint16 bits; they are widened to float32 first;
- its float -> float8_e4m3 conversion rounds values just below a power of two down by a binade
  (120..128 becomes 64) and turns overflow into NaN; the GPU (cvt.rn.satfinite) rounds to nearest
  even and saturates, as torch does after a clamp: conversions to and from fp8 go through torch.
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

        _TORCH_FLOAT = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
                        tl.float8e4nv: torch.float8_e4m3fn}
        _BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
                 torch.float8_e4m3fn: torch.uint8}
        _orig_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

        def _create_fp_to_fp(self, src, dst_type, rounding_mode):
            a, b = src.dtype.scalar, dst_type.scalar
            if tl.float8e4nv not in (a, b) or a not in _TORCH_FLOAT or b not in _TORCH_FLOAT:
                return _orig_fp_to_fp(self, src, dst_type, rounding_mode)
            t = torch.from_numpy(np.ascontiguousarray(src.data)).view(_TORCH_FLOAT[a])
            if b == tl.float8e4nv:
                t = t.float().clamp(-448.0, 448.0)
            out = t.to(_TORCH_FLOAT[b]).view(_BITS[_TORCH_FLOAT[b]]).numpy()
            return interpreter.TensorHandle(out.view(interpreter._get_np_dtype(b)), b)

        interpreter.InterpreterBuilder.create_fp_to_fp = _create_fp_to_fp


@pytest.fixture
def device():
    return "cpu"


@pytest.fixture
def big():
    return False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
