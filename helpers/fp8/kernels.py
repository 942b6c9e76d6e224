"""Triton kernels for blockwise FP8 (e4m3) W8A8: activation quant, weight quant, and the block-scaled GEMM.

Story order, as in the Triton tutorials: the kernels (private ``_name``), then their typed wrappers
(``*_triton``), each of which checks its inputs, allocates the output and launches with a grid lambda over META.
The public, validated entry points are in :mod:`helpers.fp8.quant`; the torch reference that these must match
bit for bit (codes and scales) is :mod:`helpers.fp8.reference`.

Exactness notes
---------------
* ``x / s`` and ``amax / 448`` use ``tl.math.div_rn`` (correctly rounded): on a GPU a plain ``/`` on fp32 may lower
  to an approximate division, and the codes must match torch's IEEE division bit for bit. Under the interpreter
  ``div_rn`` is numpy's IEEE division, so the same source is exact on both.
* amax is a max over the bit patterns of |x| (sign bit cleared, as int32): non-negative IEEE floats order like
  their bits, and NaN's bits sort above inf's, so a NaN propagates into the scale on every backend (a float max on
  a GPU would drop it, hiding a diverged weight from the finiteness check).
* The fp32 -> float8e4nv cast is the hardware's ``cvt.rn.satfinite`` on a GPU. Under ``TRITON_INTERPRET=1`` the
  interpreter's own cast is wrong (triton issue #8322); :mod:`helpers.fp8.interpreter` fixes it and is installed
  when this module is imported.
* The GEMM is not bit-exact across backends: the order of the fp32 sums inside ``tl.dot`` differs from torch's.

No GPU was available while writing these: they are validated under the interpreter (bit-exact against torch), and
a test compiles them ahead of time for sm_90 with Triton's bundled ptxas and checks the PTX for ``div.rn.f32``,
the saturating e4m3 conversion and fp8 ``wgmma``. The GEMM's tile sizes, warps and stages are UNTUNED guesses (see
:data:`GEMM_CONFIGS`): no GPU measurement has chosen them yet. ``HELPERS_FP8_GEMM_AUTOTUNE=1`` (or
``autotune=True``) autotunes over :data:`GEMM_CONFIGS` instead; ``python -m helpers.gpu_bench`` times both.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from helpers.core import runtime
from helpers.fp8 import interpreter
from helpers.fp8.format import FP8_DTYPE, FP8_E4M3_MAX, SCALE_EPS, check_scale_fmt

__all__ = ["quant_act_triton", "quant_weight_triton", "block_fp8_matmul_triton", "supports_fp8_dot",
           "GEMM_CONFIGS", "GEMM_AUTOTUNE_ENV", "gemm_autotuned_config"]

interpreter.install()  # no-op unless TRITON_INTERPRET=1

_ABS_BITS = 0x7FFFFFFF  # clears the fp32 sign bit
_F32_MANTISSA_MASK = 0x007FFFFF
_F32_EXPONENT_MASK = 0x7F800000


@triton.jit
def _amax_to_scale(amax_bits, FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr):
    """fp32 scale(s) from the int32 bit patterns of amax: max(amax, EPS) / FP8_MAX, optionally rounded up to 2^k."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    # tl.maximum would drop a NaN amax on a GPU (fmaxf); keep it so non-finite blocks stay visible.
    amax = tl.where(amax < EPS, EPS, amax)
    s = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
    if UE8M0:
        # 2^ceil(log2 s) on the bits: carry a non-zero mantissa into the exponent, then drop the mantissa.
        bits = s.to(tl.int32, bitcast=True)
        up = ((bits + 0x007FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        s = tl.where(bits < 0x7F800000, up, s)  # inf / NaN pass through
    return s


@triton.jit
def _quant_act_kernel(
    # pointers
    x_ptr,  # [M, K] bf16 / fp16 / fp32
    q_ptr,  # [M, K] float8e4nv
    s_ptr,  # [M, ceil(K / GROUP)] fp32
    # sizes and strides (in elements)
    M, K,
    stride_xm, stride_xk,
    stride_qm, stride_qk,
    stride_sm, stride_sk,
    # meta
    GROUP: tl.constexpr,  # group size along K (power of two)
    ROWS: tl.constexpr,  # rows per program
    UE8M0: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
):
    """One program quantizes ROWS rows x one GROUP of columns, one scale per row."""
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    offs_k = pid_g * GROUP + tl.arange(0, GROUP)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)  # a ragged last group covers only real columns
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    abs_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x| as ordered integer bits (masked-out: +0)
    s = _amax_to_scale(tl.max(abs_bits, axis=1), FP8_MAX, EPS, UE8M0)  # [ROWS]
    q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    q = tl.clamp(q, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_g * stride_sk, s, mask=offs_m < M)


@triton.jit
def _quant_weight_kernel(
    # pointers
    w_ptr,  # [N, K] bf16 / fp16 / fp32
    q_ptr,  # [N, K] float8e4nv
    s_ptr,  # [ceil(N / BLOCK_N), ceil(K / BLOCK_K)] fp32
    # sizes and strides (in elements)
    N, K,
    stride_wn, stride_wk,
    stride_qn, stride_qk,
    stride_sn, stride_sk,
    # meta
    BLOCK_N: tl.constexpr,  # the quantization block (bn, bk): one program per block
    BLOCK_K: tl.constexpr,
    UE8M0: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
):
    """One program quantizes one BLOCK_N x BLOCK_K weight block with a single scale."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)  # ragged edge blocks cover only real elements
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    w = w.to(tl.float32)
    abs_bits = w.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    s = _amax_to_scale(tl.max(tl.max(abs_bits, axis=1), axis=0), FP8_MAX, EPS, UE8M0)  # scalar
    q = tl.math.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * s)
    q = tl.clamp(q, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + pid_n * stride_sn + pid_k * stride_sk, s)


@triton.jit
def _block_fp8_matmul_kernel(
    # pointers
    a_ptr,  # [M, K] float8e4nv activations
    b_ptr,  # [N, K] float8e4nv weight (y = a @ b.T)
    c_ptr,  # [M, N] output (bf16 / fp16 / fp32)
    as_ptr,  # [M, ceil(K / BLOCK_K)] fp32 activation scales
    bs_ptr,  # [ceil(N / GROUP_N), ceil(K / BLOCK_K)] fp32 weight scales
    # sizes and strides (in elements)
    M, N, K,
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    stride_asm, stride_ask,
    stride_bsn, stride_bsk,
    # meta
    GROUP_N: tl.constexpr,  # the weight's block size along N (bn)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # = the weight's block size along K (bk): one scale pair per K tile
):
    """C tile [BLOCK_M, BLOCK_N]: for each K tile, acc += dot(a, b) * a_s[:, kb] * b_s[n // GROUP_N, kb] (fp32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N] (= b.T tile)
    as_ptrs = as_ptr + offs_m * stride_asm  # [BLOCK_M]
    bs_ptrs = bs_ptr + (offs_n // GROUP_N) * stride_bsn  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        # Zero-filled tails: padded K columns add exact zeros to the tile product.
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * stride_ask, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, c,
             mask=mask_m[:, None] & mask_n[None, :])


# GEMM tiles. UNTUNED: the default launch (BLOCK_N = 128, 4 warps, 3 stages; BLOCK_M 16 / 32 / 64 by M) is a guess
# made without a GPU. The autotuned variant below searches this small list on the first call for each (N, K) and
# M class (BLOCK_M, set from M by the wrapper, is part of the key so that decode and prefill tune apart). Once GPU
# runs of helpers.gpu_bench have shown which configs win, the default should become the measured choice and this
# note should go. A config that does not fit the GPU's shared memory fails to compile and is skipped by the tuner.
GEMM_AUTOTUNE_ENV = "HELPERS_FP8_GEMM_AUTOTUNE"  # "1": autotune the GEMM (compiled GPU runs only)
GEMM_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)
                for bn in (64, 128, 256) for warps in (4, 8) for stages in (3, 4)]
_block_fp8_matmul_autotuned = triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "BLOCK_M"])(
    _block_fp8_matmul_kernel)


def _gemm_block_m(M: int) -> int:
    """The GEMM's M tile: short for decode batches, 64 beyond (untuned)."""
    return 16 if M <= 16 else (32 if M <= 32 else 64)


def gemm_autotuned_config(M: int, N: int, K: int) -> triton.Config | None:
    """The config the autotuner chose for an [M, K] x [N, K] GEMM, or None if that (N, K, M class) is not tuned
    yet. (The tuner's cache keys start with its key values, in order: N, K, BLOCK_M.)"""
    prefix = (N, K, _gemm_block_m(M))
    for key, config in _block_fp8_matmul_autotuned.cache.items():
        if tuple(key[:3]) == prefix:
            return config
    return None


# ---------------------------------------------------------------------------------------------------------------
# Wrappers: check inputs, allocate outputs, launch with a grid lambda over META.
# ---------------------------------------------------------------------------------------------------------------

def supports_fp8_dot() -> bool:
    """True where ``tl.dot`` takes float8e4nv operands: the interpreter, or an NVIDIA GPU of compute capability
    8.9+ (Ada, Hopper, Blackwell). The quantizers run on any CUDA GPU; only the GEMM needs this."""
    if runtime.triton_interpreted():
        return True
    return runtime.has_cuda() and torch.cuda.get_device_capability() >= (8, 9)


_IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_launchable(*tensors: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not runtime.triton_interpreted():
            raise ValueError(f"Triton kernels need CUDA tensors or TRITON_INTERPRET=1; got a tensor on {t.device}")


def quant_act_triton(
    x: torch.Tensor, group_size: int, *, scale_fmt: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization. x: [M, K] bf16/fp16/fp32 -> (float8_e4m3fn [M, K], fp32 [M, ceil(K/g)])."""
    assert x.ndim == 2 and x.dtype in _IN_DTYPES, (x.shape, x.dtype)
    check_scale_fmt(scale_fmt)
    _check_launchable(x)
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((M, triton.cdiv(K, group_size)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, s
    # Rows per program: enough to keep a GPU busy per group without spilling; the interpreter prefers few programs.
    rows = min(triton.next_power_of_2(M), 64 if runtime.triton_interpreted() else 16)
    grid = lambda META: (triton.cdiv(M, META["ROWS"]), triton.cdiv(K, META["GROUP"]))  # noqa: E731
    _quant_act_kernel[grid](
        x, q, s, M, K,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        GROUP=group_size, ROWS=rows, UE8M0=scale_fmt == "ue8m0", FP8_MAX=FP8_E4M3_MAX, EPS=SCALE_EPS,
    )
    return q, s


def quant_weight_triton(
    w: torch.Tensor,
    block_size: tuple[int, int],
    *,
    scale_fmt: str = "fp32",
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 weight quantization. w: [N, K] -> (float8_e4m3fn [N, K], fp32 [ceil(N/bn), ceil(K/bk)]).

    ``out`` / ``scale_out`` (optional) receive the codes and scales in place. No finiteness check here (the public
    :func:`helpers.fp8.quant_weight` checks the scales): a non-finite block gets a NaN / inf scale.
    """
    assert w.ndim == 2 and w.dtype in _IN_DTYPES, (w.shape, w.dtype)
    check_scale_fmt(scale_fmt)
    _check_launchable(w)
    N, K = w.shape
    bn, bk = block_size
    q = torch.empty((N, K), dtype=FP8_DTYPE, device=w.device) if out is None else out
    s = torch.empty((triton.cdiv(N, bn), triton.cdiv(K, bk)), dtype=torch.float32, device=w.device) \
        if scale_out is None else scale_out
    if w.numel() == 0:
        return q, s
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(K, META["BLOCK_K"]))  # noqa: E731
    _quant_weight_kernel[grid](
        w, q, s, N, K,
        w.stride(0), w.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        BLOCK_N=bn, BLOCK_K=bk, UE8M0=scale_fmt == "ue8m0", FP8_MAX=FP8_E4M3_MAX, EPS=SCALE_EPS,
        num_warps=8 if bn * bk >= 128 * 128 else 4,
    )
    return q, s


def block_fp8_matmul_triton(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    autotune: bool | None = None,
) -> torch.Tensor:
    """y [M, N] = x_fp8 [M, K] @ w_fp8 [N, K].T, block-scaled by x_scale [M, kb] and w_scale_inv [nb, kb].

    ``autotune``: search :data:`GEMM_CONFIGS` (None: when ``HELPERS_FP8_GEMM_AUTOTUNE=1``). Ignored under the
    interpreter, where timing means nothing and the tests want one fixed launch. Only the tile shape changes: each
    output is the same sum over the same K tiles, in the same tile order."""
    assert x_fp8.ndim == 2 and w_fp8.ndim == 2 and x_fp8.shape[1] == w_fp8.shape[1]
    assert x_fp8.dtype == FP8_DTYPE and w_fp8.dtype == FP8_DTYPE and out_dtype in _OUT_DTYPES
    _check_launchable(x_fp8, x_scale, w_fp8, w_scale_inv)
    if not supports_fp8_dot():
        raise RuntimeError(
            "block_fp8_matmul_triton needs FP8 tensor cores (compute capability 8.9+, e.g. L4, H100); this GPU has "
            f"{torch.cuda.get_device_capability()}. Use backend='torch' here."
        )
    M, K = x_fp8.shape
    N = w_fp8.shape[0]
    bn, bk = block_size
    assert x_scale.shape == (M, triton.cdiv(K, bk)) and w_scale_inv.shape == (triton.cdiv(N, bn), triton.cdiv(K, bk))
    y = torch.empty((M, N), dtype=out_dtype, device=x_fp8.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    # Tile choice (untuned, see GEMM_CONFIGS): small M (decode) uses a short M tile; bk is the K tile so each tile
    # has one scale pair.
    block_m = _gemm_block_m(M)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(N, META["BLOCK_N"]))  # noqa: E731
    args = (x_fp8, w_fp8, y, x_scale, w_scale_inv, M, N, K,
            x_fp8.stride(0), x_fp8.stride(1), w_fp8.stride(0), w_fp8.stride(1), y.stride(0), y.stride(1),
            x_scale.stride(0), x_scale.stride(1), w_scale_inv.stride(0), w_scale_inv.stride(1))
    if autotune is None:
        autotune = os.environ.get(GEMM_AUTOTUNE_ENV, "0") == "1"
    if autotune and not runtime.triton_interpreted():
        _block_fp8_matmul_autotuned[grid](*args, GROUP_N=bn, BLOCK_M=block_m, BLOCK_K=bk)
        return y
    block_n = 64 if runtime.triton_interpreted() else 128
    _block_fp8_matmul_kernel[grid](*args, GROUP_N=bn, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk,
                                   num_warps=4, num_stages=3)
    return y
