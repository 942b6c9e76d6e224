"""The public blockwise FP8 API: argument checks, backend selection, dispatch to the torch or Triton path.

Both backends return bit-identical codes and scales (see :mod:`helpers.fp8.reference` for the exact semantics);
the GEMM agrees within accumulation-order rounding. ``backend="auto"`` follows
:func:`helpers.core.runtime.resolve_backend` ("triton" on a GPU, "torch" on the CPU). Asking for ``"triton"`` without a
GPU runs the kernels under the Triton interpreter - exact but slow - and warns once.
"""

from __future__ import annotations

import warnings

import torch

from helpers.core import runtime
from helpers.fp8 import reference as ref
from helpers.fp8.format import FP8_DTYPE, check_block_size, check_pow2, check_scale_fmt

__all__ = ["quant_act", "quant_weight", "dequant_weight", "block_fp8_matmul"]

# Inputs the quantizers accept.
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_interpreter_warned = False
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        warnings.warn(message, stacklevel=3)
        _warned.add(key)


def _backend(backend: str, device: torch.device) -> str:
    """Resolve the backend for tensors on ``device``; warn once when Triton must run under the interpreter."""
    global _interpreter_warned
    name = runtime.resolve_backend(backend)
    if name == "triton" and device.type != "cuda":
        if not runtime.triton_interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (set by importing helpers first); "
                f"got tensors on {device}"
            )
        if not _interpreter_warned:
            warnings.warn(
                "backend='triton' on CPU tensors: the kernels run under the Triton interpreter "
                "(TRITON_INTERPRET=1), which is exact but very slow; use backend='torch' for large tensors",
                stacklevel=3,
            )
            _interpreter_warned = True
    return name


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], ndim: int | None = None,
                  min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dim(s), got shape {tuple(t.shape)}")
    return t


def _check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all tensors must share a device")
    return first


def _check_out(out: torch.Tensor | None, scale_out: torch.Tensor | None, shape: tuple[int, ...],
               scale_shape: tuple[int, ...], device: torch.device) -> None:
    for name, t, dtype, want in (("out", out, FP8_DTYPE, shape), ("scale_out", scale_out, torch.float32, scale_shape)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(want):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(want)}, got {got}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place)")


def quant_act(
    x: torch.Tensor, group_size: int = 128, *, scale_fmt: str = "fp32", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group FP8 quantization of activations along the last dim.

    Args:
        x: [..., K] bf16 / fp16 / fp32.
        group_size: elements per group along K (power of two >= 16); the last group of a row may be partial and
            then covers only its real elements.
        scale_fmt: "fp32" (scale = max(amax, 1e-10) / 448) or "ue8m0" (that scale rounded up to a power of two).
        backend: "auto" | "triton" | "torch".

    Returns:
        (x_fp8, x_scale): float8_e4m3fn with x's shape, and fp32 scales of shape x.shape[:-1] + (ceil(K / group_size),),
        with x ~ x_fp8 * x_scale (broadcast over each group).

    The result is detached from autograd (``x`` may require grad). Non-finite input is not checked (no host sync
    in the forward path). A group holding inf gets scale inf, NaN codes
    where x is +-inf and zero codes elsewhere (x / inf); a group holding NaN gets scale NaN and all-NaN codes.
    """
    _check_tensor("x", x, _FLOAT_DTYPES, min_ndim=1)
    group_size = check_pow2("group_size", group_size)
    check_scale_fmt(scale_fmt)
    name = _backend(backend, x.device)
    K = x.shape[-1]
    x2 = x.detach().reshape(-1, K)  # rounding to FP8 has no useful gradient: the codes never carry one
    if name == "triton":
        from helpers.fp8 import kernels

        q, s = kernels.quant_act_triton(x2, group_size, scale_fmt=scale_fmt)
    else:
        q, s = ref.quant_blocks_torch(x2, (1, group_size), scale_fmt)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def quant_weight(
    w: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    *,
    scale_fmt: str = "fp32",
    backend: str = "auto",
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 quantization of a weight matrix.

    Args:
        w: [N, K] bf16 / fp16 / fp32 (an nn.Linear weight: N outputs, K inputs).
        block_size: (bn, bk), powers of two >= 16. Ragged edge blocks cover only their real elements.
        scale_fmt: "fp32" or "ue8m0" (power-of-two scales).
        backend: "auto" | "triton" | "torch".
        out: optional contiguous float8_e4m3fn [N, K] to write the codes into (in-place re-quantization).
        scale_out: optional contiguous fp32 [ceil(N / bn), ceil(K / bk)] to write the scales into.

    Returns:
        (w_fp8, w_scale_inv): float8_e4m3fn [N, K] and fp32 [ceil(N / bn), ceil(K / bk)];
        dequant is ``w_fp8 * w_scale_inv`` broadcast over blocks.

    Raises:
        ValueError: bad arguments, or a block holding inf / NaN (its block indices are named). The check runs
            on the computed scales (no extra pass over ``w``), so with ``out`` / ``scale_out`` given they may
            already hold some or all of the new codes and scales when it raises: treat them as invalid then.
    """
    _check_tensor("w", w, _FLOAT_DTYPES, ndim=2)
    bn, bk = check_block_size(block_size)
    check_scale_fmt(scale_fmt)
    N, K = w.shape
    _check_out(out, scale_out, (N, K), (-(-N // bn), -(-K // bk)), w.device)
    name = _backend(backend, w.device)
    w = w.detach()  # a trainer's parameter may require grad; the codes never carry one
    if name == "triton":
        from helpers.fp8 import kernels

        q, s = kernels.quant_weight_triton(w, (bn, bk), scale_fmt=scale_fmt, out=out, scale_out=scale_out)
        ref.check_finite_scales(s, (bn, bk), (N, K))  # one host sync per weight: the sync path, not the forward
        return q, s
    return ref.quant_blocks_torch(w, (bn, bk), scale_fmt, check_finite=True, out=out, scale_out=scale_out)


def dequant_weight(
    w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """fp32 [N, K] = ``w_fp8`` [N, K] float8_e4m3fn times its block scale ``w_scale_inv`` [ceil(N/bn), ceil(K/bk)]."""
    _check_tensor("w_fp8", w_fp8, (FP8_DTYPE,), ndim=2)
    _check_tensor("w_scale_inv", w_scale_inv, (torch.float32,), ndim=2)
    bn, bk = check_block_size(block_size)
    _check_same_device(w_fp8=w_fp8, w_scale_inv=w_scale_inv)
    N, K = w_fp8.shape
    want = (-(-N // bn), -(-K // bk))
    if tuple(w_scale_inv.shape) != want:
        raise ValueError(f"w_scale_inv must have shape {want} for w_fp8 {tuple(w_fp8.shape)} and block_size "
                         f"{(bn, bk)}, got {tuple(w_scale_inv.shape)}")
    return ref.dequant_weight_torch(w_fp8, w_scale_inv, (bn, bk))


def block_fp8_matmul(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``y = x @ w.T`` with an fp32 accumulator.

    Args:
        x_fp8: [..., K] float8_e4m3fn activations from :func:`quant_act` with ``group_size == block_size[1]``.
        x_scale: fp32 [..., ceil(K / bk)].
        w_fp8: [N, K] float8_e4m3fn; w_scale_inv: fp32 [ceil(N / bn), ceil(K / bk)] (from :func:`quant_weight`).
        block_size: the weight's (bn, bk); the K tile of the GEMM is bk.
        out_dtype: bf16, fp16 or fp32.
        backend: "auto" | "triton" | "torch".

    Returns:
        y: [..., N] in ``out_dtype``; for each K tile kb the tile product is multiplied by
        ``x_scale[:, kb] * w_scale_inv[n // bn, kb]`` and added to the fp32 accumulator.
    """
    _check_tensor("x_fp8", x_fp8, (FP8_DTYPE,), min_ndim=1)
    _check_tensor("x_scale", x_scale, (torch.float32,), ndim=x_fp8.ndim)
    _check_tensor("w_fp8", w_fp8, (FP8_DTYPE,), ndim=2)
    _check_tensor("w_scale_inv", w_scale_inv, (torch.float32,), ndim=2)
    bn, bk = check_block_size(block_size)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {out_dtype}")
    dev = _check_same_device(x_fp8=x_fp8, x_scale=x_scale, w_fp8=w_fp8, w_scale_inv=w_scale_inv)
    K = x_fp8.shape[-1]
    N, Kw = w_fp8.shape
    if Kw != K:
        raise ValueError(f"w_fp8 must have K = {K} columns to match x_fp8 {tuple(x_fp8.shape)}, "
                         f"got {tuple(w_fp8.shape)}")
    kb = -(-K // bk)
    if tuple(x_scale.shape) != (*x_fp8.shape[:-1], kb):
        raise ValueError(f"x_scale must have shape {(*x_fp8.shape[:-1], kb)} (one scale per 1 x {bk} group), "
                         f"got {tuple(x_scale.shape)}")
    if tuple(w_scale_inv.shape) != (-(-N // bn), kb):
        raise ValueError(f"w_scale_inv must have shape {(-(-N // bn), kb)} for w_fp8 {tuple(w_fp8.shape)} and "
                         f"block_size {(bn, bk)}, got {tuple(w_scale_inv.shape)}")
    name = _backend(backend, dev)
    if name == "triton" and backend == "auto" and dev.type == "cuda":
        from helpers.fp8 import kernels

        if not kernels.supports_fp8_dot():
            _warn_once("no_fp8_dot", "block_fp8_matmul: this GPU has no FP8 tensor cores (needs compute capability "
                       "8.9+); backend='auto' uses the torch path for the GEMM")
            name = "torch"
    x2 = x_fp8.reshape(-1, K)
    s2 = x_scale.reshape(-1, kb)
    if name == "triton":
        from helpers.fp8 import kernels

        y = kernels.block_fp8_matmul_triton(x2, s2, w_fp8, w_scale_inv, (bn, bk), out_dtype=out_dtype)
    else:
        y = ref.block_fp8_matmul_torch(x2, s2, w_fp8, w_scale_inv, (bn, bk), out_dtype)
    return y.view(*x_fp8.shape[:-1], N)
