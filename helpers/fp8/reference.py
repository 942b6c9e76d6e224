"""Torch blockwise FP8 (e4m3) quantization and the block-scaled GEMM: the ``backend="torch"`` path.

This module is the specification in code (the scale rule of :mod:`helpers.fp8.format`) and also the
production CPU path for the per-RL-step weight re-quantization, so it is written to be both bit-exact and fast.

Semantics, per block (a 1 x group slice of an activation row, or a bn x bk tile of a weight):

* ``amax = max |x|`` over the block's *real* elements (a partial block at a ragged edge covers only those), in fp32;
* ``s = max(amax, SCALE_EPS) / FP8_E4M3_MAX`` in fp32 (an IEEE, correctly rounded division);
* ``scale_fmt="ue8m0"``: ``s = 2 ** ceil(log2(s))``, computed exactly on the bits (no floating-point log2);
* ``q = clamp(x / s, -448, 448)`` with a true IEEE fp32 division (not ``x * (1 / s)``), then rounded to nearest
  even into float8_e4m3fn. torch's cast rounds correctly; the clamp is the spec's saturation (it does not rely
  on the cast saturating). NaN stays NaN.

An all-zero block gives zero codes and the finite positive scale ``SCALE_EPS / 448``.

Speed: one pass over cache-sized chunks (``CHUNK_ELEMS`` elements) so that the fp32 intermediate never leaves the
L2 cache; amax is taken on the integer bit patterns (clearing the sign bit: non-negative IEEE floats order like
their bits, and NaN sorts above inf, so NaN propagates); the division reads the input dtype directly and writes
into a reused fp32 scratch; ``out=`` / ``scale_out=`` let a caller re-quantize into existing tensors.
Even so, torch's CPU fp32 division and fp32 -> fp8 cast each cost more than a copy of the same bytes, so for bf16 /
fp32 CPU inputs :func:`quant_blocks_torch` hands the work to a small compiled kernel (:mod:`helpers.fp8.native`,
same arithmetic, checked bit for bit against this module's pure-torch loop) unless ``native=False``.
"""

from __future__ import annotations

import warnings

import torch

from helpers.fp8 import native as _native
from helpers.fp8.format import FP8_DTYPE, FP8_E4M3_MAX, compute_scale

__all__ = [
    "CHUNK_ELEMS",
    "quant_blocks_torch",
    "dequant_weight_torch",
    "block_fp8_matmul_torch",
]

# Elements per chunk: a bf16 chunk (0.5 MiB) plus its fp32 scratch (1 MiB) stay inside a 2 MiB L2 cache.
CHUNK_ELEMS = 1 << 18

# Integer views used to take |x| by clearing the sign bit.
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_ABS_MASK = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF}


def _block_amax(x4: torch.Tensor) -> torch.Tensor:
    """max |x| over dims 1 and 3 of a [nbr, rb, ncb, cb] view, as fp32 [nbr, ncb] (exact, NaN-propagating)."""
    int_dtype = _INT_VIEW[x4.dtype]
    a = x4.view(int_dtype) & _ABS_MASK[int_dtype]  # [nbr, rb, ncb, cb] bit patterns of |x|
    a = a.amax(dim=3).amax(dim=1)  # [nbr, ncb]; reduce the contiguous dim first (much faster than dim=(1, 3))
    return a.view(x4.dtype).float()


_warned_no_native = False


def _warn_no_native() -> None:
    global _warned_no_native
    if not _warned_no_native:
        warnings.warn(
            f"fp8: the compiled CPU quantizer is unavailable ({_native.unavailable_reason()}); using the pure-torch "
            "path, which is several times slower for large weights",
            stacklevel=4,
        )
        _warned_no_native = True


def nonfinite_block_error(i: int, j: int, block: tuple[int, int], shape: tuple[int, int]) -> ValueError:
    """The error for weight block (i, j) holding inf / NaN (a diverged policy must not reach a rollout engine)."""
    (bn, bk), (N, K) = block, shape
    return ValueError(
        f"w has non-finite values (inf or NaN) in block ({i}, {j}) (rows {i * bn}:{min((i + 1) * bn, N)}, "
        f"cols {j * bk}:{min((j + 1) * bk, K)}); refusing to quantize a diverged weight"
    )


def check_finite_scales(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> None:
    """Raise :func:`nonfinite_block_error` for the first block whose scale is not finite (one host sync)."""
    if not bool(torch.isfinite(scale).all()):
        i, j = (~torch.isfinite(scale)).nonzero()[0].tolist()
        raise nonfinite_block_error(i, j, block, shape)


def _quant_region(
    x: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
    rb: int, cb: int, bn: int, bk: int, scale_fmt: str, check_finite: bool, scratch: torch.Tensor,
) -> None:
    """Quantize x[rows, cols], a region tiled by blocks of exactly rb x cb real elements, chunk by chunk."""
    r_lo, r_hi = rows
    c_lo, c_hi = cols
    if r_hi <= r_lo or c_hi <= c_lo:
        return
    # Chunk: C columns (a multiple of cb) by R rows (a multiple of rb), about CHUNK_ELEMS elements.
    C = min(c_hi - c_lo, max(cb, (CHUNK_ELEMS // rb) // cb * cb))
    R = min(r_hi - r_lo, max(rb, (CHUNK_ELEMS // C) // rb * rb))
    for r0 in range(r_lo, r_hi, R):
        r1 = min(r0 + R, r_hi)
        nbr = (r1 - r0) // rb
        for c0 in range(c_lo, c_hi, C):
            c1 = min(c0 + C, c_hi)
            ncb = (c1 - c0) // cb
            x4 = x[r0:r1, c0:c1].view(nbr, rb, ncb, cb)  # [row blocks, rows in block, col blocks, cols in block]
            s = compute_scale(_block_amax(x4), scale_fmt)  # [nbr, ncb]
            if check_finite and not bool(torch.isfinite(s).all()):
                i, j = (~torch.isfinite(s)).nonzero()[0].tolist()
                raise nonfinite_block_error(r0 // bn + i, c0 // bk + j, (bn, bk), tuple(x.shape))
            scale_out[r0 // bn : r0 // bn + nbr, c0 // bk : c0 // bk + ncb] = s
            q = scratch[: x4.numel()].view(nbr, rb, ncb, cb)
            # True IEEE division of the input (promoted to fp32) by the block's scale, into the fp32 scratch.
            torch.div(x4, s.view(nbr, 1, ncb, 1), out=q)
            q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
            out[r0:r1, c0:c1].view(nbr, rb, ncb, cb).copy_(q)  # RNE cast to float8_e4m3fn


def quant_blocks_torch(
    x: torch.Tensor,
    block: tuple[int, int],
    scale_fmt: str = "fp32",
    *,
    check_finite: bool = False,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 quantization of a 2-D tensor (no argument validation: the public API validates).

    Args:
        x: [N, K] bf16 / fp16 / fp32, rows contiguous (stride(1) == 1).
        block: (bn, bk) block shape; (1, group) is per-token-group activation quantization.
        scale_fmt: "fp32" or "ue8m0".
        check_finite: raise ValueError naming the first block whose amax is not finite. ``out`` / ``scale_out``
            may already hold new values then (the pure-torch loop checks per chunk, the kernel after its pass).
        out: optional [N, K] float8_e4m3fn destination (rows contiguous), written in place.
        scale_out: optional fp32 [ceil(N / bn), ceil(K / bk)] destination, written in place.
        native: use the compiled CPU kernel (None: when it is available, supports the input and
            HELPERS_FP8_NATIVE is not 0; a one-time warning says when it cannot be built). False: the pure-torch
            chunked loop. True: the kernel or RuntimeError.

    Returns:
        (q, scale): float8_e4m3fn [N, K] codes and fp32 [ceil(N / bn), ceil(K / bk)] dequantization scales.
    """
    N, K = x.shape
    bn, bk = block
    if out is None:
        out = torch.empty((N, K), dtype=FP8_DTYPE, device=x.device)
    if scale_out is None:
        scale_out = torch.empty((-(-N // bn), -(-K // bk)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, scale_out
    if x.stride(1) != 1:
        x = x.contiguous()
    if native is None and not _native.enabled():
        native = False  # HELPERS_FP8_NATIVE=0: the pure-torch loop, chosen deliberately (no warning)
    if native is not False and _native.supports(x, block) and out.is_contiguous() and scale_out.is_contiguous():
        if _native.available():
            _native.quant_blocks_native(x, block, scale_fmt, out, scale_out)
            if check_finite:
                check_finite_scales(scale_out, block, (N, K))
            return out, scale_out
        if native:
            raise RuntimeError(f"native fp8 CPU kernel unavailable: {_native.unavailable_reason()}")
        _warn_no_native()
    n_full, k_full = N // bn * bn, K // bk * bk
    scratch = torch.empty(min(x.numel(), max(CHUNK_ELEMS, bn * bk)), dtype=torch.float32, device=x.device)
    # Four regions: full blocks, the ragged last column block, the ragged last row block, and their corner.
    for rows, rb in (((0, n_full), bn), ((n_full, N), N - n_full)):
        for cols, cb in (((0, k_full), bk), ((k_full, K), K - k_full)):
            _quant_region(x, out, scale_out, rows, cols, rb, cb, bn, bk, scale_fmt, check_finite, scratch)
    return out, scale_out


def quantizer_impl(x: torch.Tensor, block: tuple[int, int]) -> str:
    """Which implementation :func:`quant_blocks_torch` runs for ``x`` with ``native=None``: ``"native"`` (the
    compiled CPU kernel) or ``"torch"`` (the pure-torch loop: HELPERS_FP8_NATIVE=0, an unsupported input, or a
    kernel that could not be built, which warns). Benchmarks record it beside their timings."""
    if _native.enabled() and _native.supports(x, block) and _native.available():
        return "native"
    return "torch"


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Broadcast a [ceil(N / bn), ceil(K / bk)] block scale to the element shape [N, K] (fp32)."""
    N, K = shape
    bn, bk = block
    return scale.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]


def dequant_weight_torch(w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``w_fp8 * w_scale_inv`` broadcast over blocks: fp32 [N, K]."""
    return w_fp8.float() * expand_block_scale(w_scale_inv.float(), tuple(w_fp8.shape), block)


def block_fp8_matmul_torch(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor,
    block: tuple[int, int], out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = x @ w.T, block-scaled, fp32 accumulation (the reference for the Triton GEMM).

    Args:
        x_fp8: [M, K] float8_e4m3fn; x_scale: fp32 [M, ceil(K / bk)] (one scale per 1 x bk group).
        w_fp8: [N, K] float8_e4m3fn; w_scale_inv: fp32 [ceil(N / bn), ceil(K / bk)].
    Returns:
        [M, N] in ``out_dtype``. For each K tile kb: acc += (x_tile @ w_tile.T) * x_scale[:, kb] * w_scale[n, kb].
    """
    M, K = x_fp8.shape
    N = w_fp8.shape[0]
    bn, bk = block
    a = x_fp8.float()
    b = w_fp8.float()
    w_s = w_scale_inv.float().repeat_interleave(bn, dim=0)[:N]  # [N, kb]: the scale of each output row's block
    x_s = x_scale.float()
    acc = torch.zeros((M, N), dtype=torch.float32, device=x_fp8.device)
    for kb, k0 in enumerate(range(0, K, bk)):
        k1 = min(k0 + bk, K)
        acc += (a[:, k0:k1] @ b[:, k0:k1].T) * x_s[:, kb : kb + 1] * w_s[:, kb][None, :]
    return acc.to(out_dtype)
