"""Decode attention that reads a KV cache directly: one new query token per row against every cached slot.

``decode_attention(q, cache, layer, backend=...)`` with q ``[B, H, D]`` (the newest token's queries, after RoPE and
QK-norm) and a :class:`~helpers.kvcache.KVCache` or :class:`~helpers.kvcache.Fp8KVCache` whose ``layer`` holds
``L = cache.lengths[layer]`` slots, the last of which is the query's own. Returns fp32 ``[B, H, D]``:

    out[b, h] = sum_j softmax_j(q[b, h] . K[b, g(h), j] / sqrt(D)) V[b, g(h), j]    over slots j with key_mask[b, j]

with ``g(h) = h // (H / H_kv)`` (grouped-query attention) and, for the FP8 cache, ``K = K_code * k_scale``,
``V = V_code * v_scale`` dequantized on the fly (vLLM's Triton unified-attention path does the same; the query stays
in high precision unless the cache was built with ``fp8_query``, which :meth:`Fp8KVCache.prepare_query` applies).

Backends:

* ``"triton"``: :func:`_decode_attention_kernel`, one program per (row, query head), an online softmax over blocks
  of ``BLOCK_N`` slots. Offsets are int64: a cache of ``B * H_kv * max_len * D`` elements passes 2**31 at, e.g.,
  B=64, H_kv=8, 32k slots, D=128, where int32 offsets would wrap. Compiled on a GPU; under ``TRITON_INTERPRET=1``
  on the CPU (exact, slow: for validation on small shapes).
* ``"torch"``: :func:`decode_attention_torch`, the CPU path: the per-head scales are folded into the query
  (``q . (s_k K_code) = (s_k q) . K_code``) and the output (``P (s_v V_code) = s_v (P V_code)``), so the codes are
  only widened, never multiplied element by element. The widening is :func:`widen_fp8_codes`, a bit-level e4m3 ->
  fp16 move that is exact and several times faster than torch's CPU ``float8_e4m3fn -> float32`` cast.
* :func:`decode_attention_reference`: dequantize, then :func:`helpers.kvcache.cache.attention_reference` - the
  ground truth both backends are tested against.
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from helpers.core import runtime
from helpers.fp8.format import FP8_DTYPE
from helpers.kvcache.cache import KVCacheBase, attention_reference

__all__ = ["decode_attention", "decode_attention_torch", "decode_attention_triton", "decode_attention_reference",
           "widen_fp8_codes", "WIDEN_FACTOR"]

_interpreter_warned = False
# widen_fp8_codes returns code / 2**8: e4m3's exponent bias is 7, fp16's is 15, so moving the bits shifts by 2**-8.
WIDEN_FACTOR = 256.0
# Clears fp16 bit 14, where the sign-extended int8 -> int16 conversion left a copy of the sign (0xBFFF as int16).
_CLEAR_BIT14 = -16385
# Slots widened at a time on the torch path: the fp32 copy of a chunk stays small (4 MiB for 8 KV heads x 128 x 4
# rows) instead of a context-sized temporary that costs page faults at every decode step.
DECODE_CHUNK = 512


def widen_fp8_codes(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes (any shape) -> fp32 ``codes / 256``, exactly, through the fp16 bit layout.

    e4m3 ``S EEEE MMM`` shifted left by 7 bits is the fp16 ``S 0EEEE MMM0000000``: the same value times
    2**(7 - 15) = 2**-8, for normal and subnormal codes alike (fp16's subnormals line up with e4m3's). In torch:
    sign-extend the int8 view to int16, shift by 7, clear bit 14 (the copied sign), view as fp16, widen to fp32.
    Three vectorised integer passes and a hardware fp16 -> fp32 conversion, against torch's per-element fp8 cast.
    The NaN code (``S.1111.111``, written only for NaN inputs) comes out as +-480 / 256 instead of NaN.
    """
    h = codes.view(torch.int8).to(torch.int16)
    h.bitwise_left_shift_(7).bitwise_and_(_CLEAR_BIT14)
    return h.view(torch.float16).float()


def _check(q: object, cache: object, layer: object) -> tuple[torch.Tensor, KVCacheBase, int]:
    if not isinstance(cache, KVCacheBase) or not hasattr(cache, "k"):
        raise ValueError(f"cache must be a KVCache or Fp8KVCache, got {type(cache).__name__}")
    layer = cache._check_layer(layer)
    n_head = q.shape[1] if isinstance(q, torch.Tensor) and q.ndim == 3 else None
    if (not isinstance(q, torch.Tensor) or q.ndim != 3 or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim
            or n_head % cache.n_kv_head or not q.is_floating_point()):
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a float tensor [{cache.batch}, H, {cache.head_dim}] with H a multiple of "
                         f"n_kv_head={cache.n_kv_head}, got {got}")
    if cache.lengths[layer] < 1:
        raise ValueError(f"layer {layer} of the cache is empty: append the query token's k / v first")
    return q, cache, layer


def _scales(cache: KVCacheBase, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v dequant multipliers of ``layer`` as fp32 ``[H_kv]`` (ones for a high-precision cache)."""
    ks = getattr(cache, "k_scale", None)
    if ks is None:
        one = torch.ones(cache.n_kv_head, dtype=torch.float32, device=cache.device)
        return one, one
    k_s, v_s = cache.k_scale[layer], cache.v_scale[layer]
    return k_s.expand(cache.n_kv_head).float(), v_s.expand(cache.n_kv_head).float()


def decode_attention_reference(q: torch.Tensor, cache: KVCacheBase, layer: int) -> torch.Tensor:
    """Dequantize the layer's slots and run :func:`attention_reference` (fp32 ``[B, H, D]``)."""
    q, cache, layer = _check(q, cache, layer)
    k, v = cache.read(layer)
    n = cache.lengths[layer]
    return attention_reference(q[:, :, None], k, v, cache.key_mask[:, :n])[:, :, 0]


def decode_attention_torch(q: torch.Tensor, cache: KVCacheBase, layer: int) -> torch.Tensor:
    """The CPU path: scales folded into q and the output, codes widened to fp32 chunk by chunk of
    :data:`DECODE_CHUNK` slots (fp32 ``[B, H, D]``)."""
    q, cache, layer = _check(q, cache, layer)
    b, h, d = q.shape
    hkv, n = cache.n_kv_head, cache.lengths[layer]
    k_s, v_s = _scales(cache, layer)  # [H_kv]
    codes = cache.k.dtype == FP8_DTYPE
    if codes:  # widened codes are code / 256: fold the 256 into the scales
        k_s, v_s = k_s * WIDEN_FACTOR, v_s * WIDEN_FACTOR
    widen = widen_fp8_codes if codes else torch.Tensor.float
    qg = q.float().view(b, hkv, h // hkv, d) * (k_s / math.sqrt(d))[None, :, None, None]  # [B, H_kv, G, D]
    chunks = range(0, n, DECODE_CHUNK)
    scores = torch.cat([qg @ widen(cache.k[layer, :, :, i:min(i + DECODE_CHUNK, n)]).transpose(-1, -2)
                        for i in chunks], dim=-1)  # [B, H_kv, G, L]
    visible = cache.key_mask[:, :n].clone()
    visible[:, n - 1] = True  # the query's own slot (a padding query still gets a finite, unused output)
    p = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    out = sum(p[..., i:i + DECODE_CHUNK] @ widen(cache.v[layer, :, :, i:min(i + DECODE_CHUNK, n)])
              for i in chunks)  # [B, H_kv, G, D]
    return (out * v_s[None, :, None, None]).reshape(b, h, d)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, H, D] fp32
    k_ptr, v_ptr,  # [B, H_kv, max_len, D] fp8 codes or high-precision values (one layer of the cache)
    ks_ptr, vs_ptr,  # [H_kv] fp32 dequant multipliers
    mask_ptr,  # [B, max_len] int8, 1 = real token
    out_ptr,  # [B, H, D] fp32
    n_slots, n_head, group, sm_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,  # k and v share strides (same storage layout); last dim contiguous
    stride_mb,
    stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_head).to(tl.int64)  # int64 from here on: offsets into a long cache overflow int32
    hq = (pid % n_head).to(tl.int64)
    hk = hq // group
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k_scale = tl.load(ks_ptr + hk)
    v_scale = tl.load(vs_ptr + hk)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_d, mask=dmask, other=0.0)
    q = q * (k_scale * sm_scale)  # fold the k scale and 1/sqrt(D) into the query
    base = b * stride_kb + hk * stride_kh
    # Online softmax state; m starts finite so that a fully masked block gives exp(-inf - m) = 0, not NaN.
    m_i = tl.full([1], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, n_slots, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        in_range = offs_n < n_slots
        real = tl.load(mask_ptr + b * stride_mb + offs_n, mask=in_range, other=0)
        visible = in_range & ((real != 0) | (offs_n == n_slots - 1))  # the query always sees its own slot
        kv_off = base + offs_n[:, None] * stride_kn + offs_d[None, :]
        kv_mask = in_range[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D], dequant on load
        s = tl.sum(k * q[None, :], axis=1)  # [BLOCK_N]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # [1]
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)  # [BLOCK_N]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc * (v_scale / l_i)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, out, mask=dmask)


def decode_attention_triton(q: torch.Tensor, cache: KVCacheBase, layer: int, *, block_n: int = 64) -> torch.Tensor:
    """The Triton kernel (fp32 ``[B, H, D]``); see the module docstring. ``block_n``: slots per inner step."""
    global _interpreter_warned
    q, cache, layer = _check(q, cache, layer)
    if q.device.type != "cuda" and not runtime.triton_interpreted():
        raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (set by importing helpers first)")
    if q.device.type != "cuda" and not _interpreter_warned:
        warnings.warn("decode_attention backend='triton' on CPU runs under the Triton interpreter (exact, very slow); "
                      "use backend='torch' beyond small validation shapes", stacklevel=2)
        _interpreter_warned = True
    b, h, d = q.shape
    n = cache.lengths[layer]
    k, v = cache.k[layer], cache.v[layer]  # [B, H_kv, max_len, D]
    k_s, v_s = _scales(cache, layer)
    qf = q.float().contiguous()
    mask = cache.key_mask.to(torch.int8)  # [B, max_len]; the interpreter cannot load torch.bool
    out = torch.empty(b, h, d, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(b * h,)](
        qf, k, v, k_s.contiguous(), v_s.contiguous(), mask, out,
        n, h, h // cache.n_kv_head, 1.0 / math.sqrt(d),
        qf.stride(0), qf.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        mask.stride(0),
        out.stride(0), out.stride(1),
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
    )
    return out


def decode_attention(q: torch.Tensor, cache: KVCacheBase, layer: int, *, backend: str = "auto") -> torch.Tensor:
    """Decode attention over the cache; ``backend`` ``"auto"`` (Triton on a GPU, torch on the CPU) | ``"triton"``
    | ``"torch"``. q ``[B, H, D]`` -> fp32 ``[B, H, D]``."""
    name = runtime.resolve_backend(backend)
    if name == "triton":
        return decode_attention_triton(q, cache, layer)
    return decode_attention_torch(q, cache, layer)
