"""GPU tier (``pytest -m gpu``, ``make gpu-test``): the compiled decode-attention kernel
(:func:`helpers.kvcache.decode_attention_triton`) over the FP8 and the BF16 KV cache, at Qwen3-8B attention shapes
(32 query heads, 8 KV heads of 128) and 1 to 32k cached slots, against the dequantize-then-attend reference
(:func:`helpers.kvcache.decode_attention_reference`, fp32, on the CPU) within the bound derived in
:func:`_tolerance`; and a cache past 2^31 elements, where int32 offsets would wrap.

Without a CUDA device every test here is collected and skipped with the reason "no CUDA device".
"""

from __future__ import annotations

import math

import helpers  # noqa: F401  (sets TRITON_INTERPRET=1 on CPU before triton is imported)
import pytest
import torch

from helpers.core import runtime
from helpers.kvcache import (Fp8KVCache, KVCache, KVScales, attention_reference, compute_qkv_scales,
                             decode_attention, decode_attention_triton)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not runtime.has_cuda(), reason="no CUDA device"),
    pytest.mark.skipif(runtime.has_cuda() and runtime.triton_interpreted(),
                       reason="TRITON_INTERPRET is set: this tier checks the compiled kernels"),
]

CUDA = "cuda"
H, H_KV, D = 32, 8, 128  # Qwen3-8B attention
U = 2.0**-24  # fp32 unit roundoff
# ex2.approx.f32 (what tl.exp lowers to) has a relative error below 2^-22 (PTX ISA); 2^-21 leaves room for the
# rounding of its argument's log2(e) scaling.
U_EXP = 2.0**-21
KINDS = ["bf16", "fp8_tensor", "fp8_head"]
CASES = [(1, 1), (3, 83), (16, 1024), (4, 4097), (4, 32768)]  # (B, L): one slot, ragged blocks, 1k-32k contexts


def _tolerance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """A bound on |kernel - reference| for q [B, H, D] and the dequantized k, v [B, H_kv, L, D].

    Scores s_j = q . k_j / sqrt(D): both paths compute them in fp32 in some order (the kernel with the k scale and
    1/sqrt(D) folded into q), so each differs from the exact value by at most
    delta = (D + 4) U sum_i |q_i k_ji| / sqrt(D) <= (D + 4) U |q| |k_j| / sqrt(D) (Cauchy-Schwarz, maximised over
    heads and slots). Perturbing every score by <= delta, and every exp by a relative U_EXP, scales each softmax
    weight by a factor within exp(+-(2 delta + 2 U_EXP)); the weighted mean of v then moves by at most that factor
    minus 1 times 2 max|v|. The weighted sum over L slots and the normalisation add <= (L + 2 log2 L + 4) U max|v|
    per path, in any order. Both paths carry these errors, hence the factor 2 on each."""
    L = k.shape[2]
    delta = (D + 4) * U * float(q.norm(dim=-1).max() * k.norm(dim=-1).max()) / math.sqrt(D)
    vmax = float(v.abs().max())
    weights = math.expm1(2 * (2 * delta + 2 * U_EXP))
    return 2 * vmax * weights * 2 + 2 * (L + 2 * math.log2(max(L, 2)) + 4) * U * vmax


def _filled(kind: str, b: int, n: int, seed: int) -> tuple[KVCache | Fp8KVCache, torch.Tensor]:
    """A one-layer cache of ``n`` slots on the GPU and a query [b, H, D]. Keys are 4x wider than values so the
    attention is peaked (outputs of order 1: a wrong slot or head would show), rows have left padding of different
    lengths and row 0 a padded slot in the middle (a finished sequence's pad token)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    k = torch.randn(b, H_KV, n, D, generator=g, device=CUDA) * 4
    v = torch.randn(b, H_KV, n, D, generator=g, device=CUDA)
    q = torch.randn(b, H, D, generator=g, device=CUDA)
    mask = torch.ones(b, n, dtype=torch.bool, device=CUDA)
    for row in range(b):
        mask[row, : (17 * row) % n] = False
    if n > 3:
        mask[0, n // 2] = False
    if kind == "bf16":
        cache = KVCache(1, b, n, H_KV, D, dtype=torch.bfloat16, device=CUDA)
        cache.append(0, k.bfloat16(), v.bfloat16(), mask)
    else:
        granularity = kind.split("_")[1]
        qs, ks, vs = compute_qkv_scales(q[:, :, None], k, v, granularity=granularity)
        cache = Fp8KVCache(1, b, n, H_KV, D, n_head=H, granularity=granularity, device=CUDA,
                           scales=KVScales(qs[None], ks[None], vs[None]))
        cache.append(0, k, v, mask)
    return cache, q


def _reference(q: torch.Tensor, cache: KVCache | Fp8KVCache, rows: list[int] | None = None
               ) -> tuple[torch.Tensor, float]:
    """fp32 reference on the CPU for ``rows`` (default all) and the tolerance for them."""
    k, v = cache.read(0)
    sel = slice(None) if rows is None else rows
    q, k, v = q[sel].float().cpu(), k[sel].float().cpu(), v[sel].float().cpu()
    mask = cache.key_mask[sel, : cache.lengths[0]].cpu()
    return attention_reference(q[:, :, None], k, v, mask)[:, :, 0], _tolerance(q, k, v)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=[f"B{b}-L{n}" for b, n in CASES])
def test_decode_attention_matches_reference(kind, case):
    b, n = case
    cache, q = _filled(kind, b, n, seed=b * 100003 + n)
    out = decode_attention(q, cache, 0, backend="triton")
    assert out.shape == (b, H, D) and out.dtype == torch.float32 and out.device == q.device
    ref, tol = _reference(q, cache)
    err = (out.cpu() - ref).abs()
    assert bool(torch.isfinite(out).all())
    assert float(err.max()) <= tol, f"max |err| {float(err.max()):.3g} > tolerance {tol:.3g}"
    assert float(ref.abs().max()) > 10 * tol or n == 1  # the outputs are large enough for the check to bite


@pytest.mark.parametrize("block_n", [16, 128])
def test_decode_attention_block_size_does_not_change_the_result_beyond_rounding(block_n):
    cache, q = _filled("fp8_head", 4, 4097, seed=3)
    ref, tol = _reference(q, cache)
    out = decode_attention_triton(q, cache, 0, block_n=block_n).cpu()
    assert float((out - ref).abs().max()) <= tol


def test_decode_attention_past_int32_offsets():
    """B=64 rows x 8 KV heads x 32768 slots x 128 = 2^31 elements per K / V: the last rows' offsets pass 2^31 - 1,
    where int32 arithmetic would wrap and read the wrong slots. Rows 0, 32 and 63 against the reference."""
    b, n, chunk = 64, 32768, 2048
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(b, H, D, generator=g, device=CUDA)
    k = torch.randn(b, H_KV, chunk, D, generator=g, device=CUDA) * 4
    v = torch.randn(b, H_KV, chunk, D, generator=g, device=CUDA)
    # Scales from the first chunk (later slots may saturate, which read() and the kernel see alike).
    qs, ks, vs = compute_qkv_scales(q[:, :, None], k, v, granularity="tensor")
    cache = Fp8KVCache(1, b, n, H_KV, D, n_head=H, device=CUDA, scales=KVScales(qs[None], ks[None], vs[None]))
    assert cache.k[0].numel() >= 2**31
    for start in range(0, n, chunk):  # chunks keep the fp32 temporaries of the FP8 write small
        if start:
            k = torch.randn(b, H_KV, chunk, D, generator=g, device=CUDA) * 4
            v = torch.randn(b, H_KV, chunk, D, generator=g, device=CUDA)
        cache.append(0, k, v)
    del k, v
    rows = [0, 32, 63]
    out = decode_attention(q, cache, 0, backend="triton")[rows].cpu()
    ref, tol = _reference(q, cache, rows)
    assert float((out - ref).abs().max()) <= tol
