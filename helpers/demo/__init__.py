"""Notebook 00's first Triton kernel, the place to start reading: :mod:`helpers.demo.axpy` holds a small kernel
(``out = alpha * x + y``), its torch reference, the timing of both, and the rule that turns the comparison into the
notebook's verdict. The FP8 kernels of the other notebooks follow the same pattern in :mod:`helpers.fp8.kernels`.
"""

from helpers.demo.axpy import KernelCheck, axpy_torch, axpy_triton, check_kernel, time_axpy

__all__ = ["axpy_triton", "axpy_torch", "time_axpy", "KernelCheck", "check_kernel"]
