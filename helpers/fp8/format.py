"""The FP8 format, in one place: the e4m3 constants, the scale rule, and the validation every FP8 module shares.

Every other module of the package (quantizers, kernels, Fp8Linear, the KV cache, the studies) imports these; none
defines its own.

Format: ``float8_e4m3fn`` (OCP FP8 E4M3, "fn" = finite + NaN, no inf): 1 sign, 4 exponent (bias 7), 3 mantissa
bits; largest finite value ``S.1111.110 = 1.75 * 2**8 = 448``; ``S.1111.111`` is NaN; smallest subnormal ``2**-9``.

Scale rule (DeepSeek-V3 ``inference/kernel.py``, vLLM ``per_token_group_quant_fp8``; FP8-RL, arXiv 2601.18150):
the dequantization multiplier of a block is ``s = max(amax, SCALE_EPS) / 448`` in fp32 (a correctly rounded IEEE
division), the codes are ``q = round_to_nearest_even(clamp(x / s, -448, 448))`` and ``x ~ q * s``.
``scale_fmt="ue8m0"`` rounds ``s`` up to a power of two (DeepGEMM / DeepSeek-V3.1's UE8M0 scales), so that a
dequantized code is exact in bf16. ``SCALE_EPS = 1e-10`` is vLLM's floor: an all-zero block gets the finite scale
``1e-10 / 448`` and zero codes (DeepSeek-V3 uses 1e-4; torchao none, which gives NaN for an all-zero block).

Engines' names for the stored pieces (vLLM / SGLang loaders of DeepSeek-V3, Qwen3-FP8 checkpoints): ``weight``
(float8_e4m3fn codes), ``weight_scale_inv`` (the fp32 ``s`` per block, a dequant *multiplier* despite the name) and
``quantization_config.weight_block_size = [128, 128]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "FP8_DTYPE", "FP8_E4M3_MAX", "SCALE_EPS", "SCALE_FMTS", "MIN_BLOCK", "DEFAULT_BLOCK",
    "ue8m0_round_up", "compute_scale", "fake_quant", "check_scale_fmt", "check_pow2", "check_block_size", "block_shape",
]

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value (S.1111.110 = 1.75 * 2**8); torch.finfo reads it from the dtype.
FP8_E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)
# Floor on amax so that an all-zero block gets a finite positive scale (vLLM's per_token_group_quant_fp8 value).
SCALE_EPS = 1e-10
SCALE_FMTS = ("fp32", "ue8m0")
# Smallest group / block edge: below 16 a tl.dot tile is not supported on GPUs, and scales would cost more than codes.
MIN_BLOCK = 16
# The block size of every public FP8 checkpoint (DeepSeek-V3, Qwen3-FP8) and of DeepGEMM's kernels.
DEFAULT_BLOCK = (128, 128)

_F32_MANTISSA_MASK = 0x007FFFFF
_F32_EXPONENT_MASK = 0x7F800000


def check_scale_fmt(scale_fmt: object) -> str:
    """``scale_fmt`` if it is one of :data:`SCALE_FMTS`, else ValueError naming the value."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    return scale_fmt  # type: ignore[return-value]


def check_pow2(name: str, value: object) -> int:
    """``value`` if it is an int power of two >= :data:`MIN_BLOCK` (a group or block edge), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {value!r}")
    return value


def check_block_size(block_size: object) -> tuple[int, int]:
    """``(bn, bk)`` from a pair of powers of two >= :data:`MIN_BLOCK`, else ValueError naming the value."""
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise ValueError(f"block_size must be a pair (bn, bk) of powers of two >= {MIN_BLOCK}, got {block_size!r}")
    return check_pow2("block_size[0]", block_size[0]), check_pow2("block_size[1]", block_size[1])


def ue8m0_round_up(s: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two, exactly: ``2 ** ceil(log2(s))``.

    On the bits: a normal fp32 ``s`` is an exact power of two iff its mantissa field is zero; otherwise adding
    ``0x7FFFFF`` carries one into the exponent field, and masking the mantissa away leaves the next power of two.
    Non-finite entries (inf, NaN) are passed through unchanged. Returns a new fp32 tensor of the same shape.
    """
    bits = s.contiguous().view(torch.int32)
    rounded = ((bits + _F32_MANTISSA_MASK) & _F32_EXPONENT_MASK).view(torch.float32)
    return torch.where(torch.isfinite(s), rounded, s)


def compute_scale(amax: torch.Tensor, scale_fmt: str = "fp32") -> torch.Tensor:
    """Dequantization scale per block from its ``amax``: ``max(amax, SCALE_EPS) / 448`` (ue8m0: next pow2).

    ``amax`` is any shape (cast to fp32); returns fp32 of the same shape. NaN / inf amax give NaN / inf scales.
    """
    check_scale_fmt(scale_fmt)
    # clamp_min keeps NaN (torch.clamp propagates NaN); the division is IEEE fp32.
    s = amax.float().clamp_min(SCALE_EPS) / FP8_E4M3_MAX
    return ue8m0_round_up(s) if scale_fmt == "ue8m0" else s


def fake_quant(x: torch.Tensor, amax: torch.Tensor, scale_fmt: str = "fp32") -> torch.Tensor:
    """Quantize ``x`` to e4m3 with the scale of ``amax`` and dequantize: fp32 ``clamp(x / s, +-448).to(e4m3) * s``.

    ``amax`` broadcasts against ``x`` (a scalar for per-tensor, ``[N, 1]`` per row, a tile view per block); the
    scale is :func:`compute_scale`. This is the one quantize-then-dequantize of the package: the error studies and
    the toy policies all call it (the production quantizers compute the same codes with fused kernels).
    """
    s = compute_scale(amax, scale_fmt)
    q = (x.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)  # torch's cast: round to nearest even
    return q.float() * s


def block_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the block-scale grid of an [N, K] tensor: ``(ceil(N / bn), ceil(K / bk))``."""
    (n, k), (bn, bk) = shape, block
    return -(-n // bn), -(-k // bk)
