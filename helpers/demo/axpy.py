"""A first Triton kernel (``out = alpha * x + y``) with its torch reference: the environment check of notebook 00.

On a GPU it compiles; on a CPU-only machine it runs under the Triton interpreter (see :mod:`helpers.core.runtime`).
Under the interpreter each element is one fp32 multiply then one add, exactly as torch does, so the two agree bit
for bit. Compiled for a GPU, the compiler may contract the multiply-add into one FMA (one rounding instead of two):
there the comparison allows one unit in the last place. :func:`check_kernel` is that rule, and the verdict of
notebook 00.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import helpers.core.runtime  # noqa: F401  (sets TRITON_INTERPRET before triton is imported on CPU-only machines)
from helpers.core.timing import median_time
import triton
import triton.language as tl

__all__ = ["axpy_triton", "axpy_torch", "time_axpy", "KernelCheck", "check_kernel"]


@triton.jit
def _axpy_kernel(
    x_ptr,  # [n] fp32
    y_ptr,  # [n] fp32
    out_ptr,  # [n] fp32
    alpha,  # fp32 scalar
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


def axpy_torch(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference: ``alpha * x + y`` (fp32)."""
    return alpha * x + y


def axpy_triton(x: torch.Tensor, y: torch.Tensor, alpha: float, *, block: int = 1024) -> torch.Tensor:
    """``alpha * x + y`` for contiguous fp32 tensors of equal shape on the same device."""
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise ValueError(f"x and y must be float32, got {x.dtype} and {y.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _axpy_kernel[grid](x, y, out, float(alpha), n, BLOCK=block)
    return out


def time_axpy(n: int, *, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Median wall time (s) of the Triton kernel and of the torch reference on ``n`` elements, and their ratio."""
    g = torch.Generator().manual_seed(seed)
    dev = helpers.core.runtime.device()
    x = torch.randn(n, generator=g).to(dev)
    y = torch.randn(n, generator=g).to(dev)

    t_triton = median_time(lambda: axpy_triton(x, y, 0.5), repeats=repeats)
    t_torch = median_time(lambda: axpy_torch(x, y, 0.5), repeats=repeats)
    return {"n": n, "triton_s": t_triton, "torch_s": t_torch, "ratio": t_triton / t_torch}


@dataclass(frozen=True)
class KernelCheck:
    """The comparison of a kernel's output with its torch reference, and the verdict it gives."""

    n: int
    """Elements compared."""
    max_abs_diff: float
    """max |kernel - reference| over the elements."""
    bit_exact: bool
    """``torch.equal(kernel, reference)``."""
    tolerance: float
    """The allowed max |difference|: 0 under the interpreter; one ulp of the largest |reference| value when
    compiled (``eps_fp32 * max |reference|``), since the compiler may contract the multiply-add into one FMA."""
    interpreted: bool
    """True when the kernel ran under the Triton interpreter."""

    @property
    def passed(self) -> bool:
        """Bit-exact under the interpreter; within :attr:`tolerance` when compiled."""
        return self.bit_exact if self.interpreted else self.max_abs_diff <= self.tolerance

    @property
    def verdict(self) -> str:
        """``"reproduced"`` when :attr:`passed`, else ``"not reproduced"``."""
        return "reproduced" if self.passed else "not reproduced"

    @property
    def reason(self) -> str:
        """One sentence: what was measured, and under which rule."""
        mode = "interpreter, bit-exact required" if self.interpreted else f"compiled, <= {self.tolerance:.3g} allowed"
        return f"max |difference| {self.max_abs_diff:.3g} on {self.n} fp32 elements ({mode})"


def check_kernel(out_kernel: torch.Tensor, out_reference: torch.Tensor, *, interpreted: bool) -> KernelCheck:
    """Compare a kernel's fp32 output with its torch reference (same shape) under notebook 00's rule
    (:class:`KernelCheck`). ``interpreted``: whether the kernel ran under the Triton interpreter."""
    if out_kernel.shape != out_reference.shape:
        raise ValueError(f"out_kernel and out_reference must have the same shape, got {tuple(out_kernel.shape)} and "
                         f"{tuple(out_reference.shape)}")
    if out_kernel.dtype != torch.float32 or out_reference.dtype != torch.float32:
        raise ValueError(f"outputs must be float32, got {out_kernel.dtype} and {out_reference.dtype}")
    if out_kernel.numel() == 0:
        raise ValueError("outputs must hold at least one element, got none")
    diff = (out_kernel - out_reference.to(out_kernel.device)).abs()
    ulp = torch.finfo(torch.float32).eps * out_reference.abs().max().item()
    return KernelCheck(n=out_kernel.numel(), max_abs_diff=diff.max().item(),
                       bit_exact=torch.equal(out_kernel, out_reference.to(out_kernel.device)),
                       tolerance=0.0 if interpreted else ulp, interpreted=interpreted)
