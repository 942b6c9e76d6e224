"""A fix for the Triton interpreter's fp32 / fp16 / bf16 -> float8e4nv cast (``TRITON_INTERPRET=1`` only).

The bug (triton 3.5 to 3.9, still present in 3.9.0): the interpreter converts floats to fp8 with its own numpy
bit-twiddling (``triton.runtime.interpreter._convert_float``), which

* rounds the mantissa but never propagates the carry into the exponent, so a value that rounds up across a power
  of two is halved: 124.07 -> 64 (should be 128), 7.84 -> 4 (should be 8);
* does not saturate: 500 -> 256 and -470 -> NaN (should be 448 and -448, as the GPU's ``cvt.rn.satfinite``);
* flushes values in fp8's subnormal range to zero and turns NaN into a finite number.

A second interpreter cast bug of the same family matters here: fp32 -> bf16 (``create_fp_trunc``, used by
``acc.to(tl.bfloat16)`` for the GEMM's output) truncates toward zero instead of rounding to nearest even as the
GPU's ``cvt.rn.bf16.f32`` does (1.5529 -> 1.5469 instead of 1.5547). It is fixed the same way, in ``cast_impl``
(no upstream report of this one was found at the time of writing; it is worth filing beside #8322).

Upstream: triton-lang/triton issue #8322; PRs #9808, #11897, #11667 (still open at the time of writing). When one
of them lands and ships, this patch becomes a no-op that can be deleted (``tests/test_fp8_interpreter.py`` checks
the raw interpreter and will tell).

The fix lives where the bug is: :meth:`InterpreterBuilder.create_fp_to_fp` (and ``cast_impl``), the
interpreter's implementation of the casts. For a round-to-nearest-even downcast to float8e4nv we let torch do the
conversion (its CPU cast is correct: RNE, saturating to +-448, NaN preserved - the same results as the GPU's
satfinite conversion); every other conversion goes to the original method. Compiled kernels on a GPU never touch
this code, so what a kernel computes on a GPU is unchanged. :func:`install` is idempotent and only patches when
the interpreter is active.
"""

from __future__ import annotations

import numpy as np
import torch

from helpers.core import runtime

__all__ = ["install", "uninstall", "is_installed"]

_original_create_fp_to_fp = None  # the interpreter's own methods while the fix is installed
_original_cast_impl = None


def _torch_view(data: np.ndarray, dtype) -> torch.Tensor:
    """Wrap an interpreter numpy payload (bf16 is stored as uint16) as a torch tensor of the matching float type."""
    import triton.language as tl

    arr = np.ascontiguousarray(data)
    if dtype == tl.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _fixed_create_fp_to_fp(self, src, dst_type, rounding_mode):
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    src_ty = src.dtype.scalar
    dst_ty = dst_type.scalar
    if (
        dst_ty == tl.float8e4nv
        and src_ty in (tl.float32, tl.float16, tl.bfloat16)
        and rounding_mode in (None, ir.ROUNDING_MODE.RTNE)
    ):
        codes = _torch_view(src.data, src_ty).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return TensorHandle(codes.reshape(np.shape(src.data)), dst_ty)
    return _original_create_fp_to_fp(self, src, dst_type, rounding_mode)


def _fixed_cast_impl(self, src, dst_type):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        # Round to nearest even (torch), stored as the interpreter stores bf16: uint16 bit patterns.
        bits = _torch_view(src.data, tl.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return TensorHandle(bits.reshape(np.shape(src.data)), dst_type.scalar)
    return _original_cast_impl(self, src, dst_type)


def is_installed() -> bool:
    """True while the corrected cast is patched into the interpreter."""
    return _original_create_fp_to_fp is not None


def install() -> bool:
    """Patch the interpreter's float -> float8e4nv cast (idempotent). Returns True when the fix is active.

    Does nothing (returns False) when Triton is not running under the interpreter.
    """
    global _original_create_fp_to_fp, _original_cast_impl
    if not runtime.triton_interpreted():
        return False
    if _original_create_fp_to_fp is None:
        from triton.runtime.interpreter import InterpreterBuilder

        _original_create_fp_to_fp = InterpreterBuilder.create_fp_to_fp
        _original_cast_impl = InterpreterBuilder.cast_impl
        InterpreterBuilder.create_fp_to_fp = _fixed_create_fp_to_fp
        InterpreterBuilder.cast_impl = _fixed_cast_impl
    return True


def uninstall() -> None:
    """Restore the interpreter's original casts (used by the tests that show the raw interpreter is wrong)."""
    global _original_create_fp_to_fp, _original_cast_impl
    if _original_create_fp_to_fp is not None:
        from triton.runtime.interpreter import InterpreterBuilder

        InterpreterBuilder.create_fp_to_fp = _original_create_fp_to_fp
        InterpreterBuilder.cast_impl = _original_cast_impl
        _original_create_fp_to_fp = _original_cast_impl = None
