"""A first Triton kernel (``out = alpha * x + y``) with its torch reference: the environment check of notebook 00.

On a GPU it compiles; on a CPU-only machine it runs under the Triton interpreter (see :mod:`helpers.core.runtime`).
Under the interpreter each element is one fp32 multiply then one add, exactly as torch does, so the two agree bit
for bit. Compiled for a GPU, the compiler may contract the multiply-add into one FMA (one rounding instead of two):
there the comparison allows one unit in the last place.
"""

from __future__ import annotations

import torch

import helpers.core.runtime  # noqa: F401  (sets TRITON_INTERPRET before triton is imported on CPU-only machines)
from helpers.core.timing import median_time
import triton
import triton.language as tl

__all__ = ["axpy_triton", "axpy_torch", "time_axpy"]


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
