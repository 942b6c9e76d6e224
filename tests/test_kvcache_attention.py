"""Decode attention over the caches: the Triton kernel (under the interpreter on CPU) and the torch path against
the dequantize-then-attend reference, on awkward shapes, with GQA, left padding and per-head scales."""

from __future__ import annotations

import warnings

import pytest
import torch

import helpers  # noqa: F401
from helpers.kvcache import (Fp8KVCache, KVCache, KVScales, compute_qkv_scales, decode_attention,
                             decode_attention_reference, decode_attention_torch, decode_attention_triton)

# The paths differ from the reference only in summation order and in where the scales are applied (folded into q
# and the output instead of multiplied into every code): fp32 rounding, ~1e-6 on outputs of order 1.
ATOL = 1e-5


def _filled(kind, b, h, hkv, d, n, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=g) * 4
    v = torch.randn(b, hkv, n, d, generator=g)
    q = torch.randn(b, h, n, d, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    if pad:  # left padding of different lengths, and a padded slot in the middle (a finished row's pad token)
        for row in range(b):
            mask[row, : row % max(n - 1, 1)] = False
        if n > 3:
            mask[0, n // 2] = False
    if kind == "hp":
        cache = KVCache(1, b, n + 3, hkv, d)
    else:
        granularity = kind.split("_")[1]
        qs, ks, vs = compute_qkv_scales(q, k, v, granularity=granularity)
        cache = Fp8KVCache(1, b, n + 3, hkv, d, n_head=h, granularity=granularity,
                           scales=KVScales(qs[None], ks[None], vs[None]))
    cache.append(0, k, v, mask)
    return cache, torch.randn(b, h, d, generator=g)


SHAPES = [  # (B, H, H_kv, D, L)
    (1, 1, 1, 16, 1),
    (2, 4, 2, 16, 7),
    (3, 8, 2, 32, 83),
    (2, 6, 3, 24, 130),  # D not a power of two; L spans 3 blocks of 64
    (1, 4, 4, 64, 64),
]


@pytest.mark.parametrize("kind", ["hp", "fp8_tensor", "fp8_head"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_triton_and_torch_paths_match_the_reference(kind, shape, monkeypatch):
    import helpers.kvcache.attention as attention

    monkeypatch.setattr(attention, "DECODE_CHUNK", 32)  # several chunks on the torch path (L up to 130)
    b, h, hkv, d, n = shape
    cache, q = _filled(kind, b, h, hkv, d, n, seed=n)
    ref = decode_attention_reference(q, cache, 0)
    assert ref.shape == (b, h, d) and ref.dtype == torch.float32
    torch.testing.assert_close(decode_attention_torch(q, cache, 0), ref, atol=ATOL, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interpreter warning
        tri = decode_attention_triton(q, cache, 0, block_n=32)
    torch.testing.assert_close(tri, ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(decode_attention(q, cache, 0, backend="torch"), ref, atol=ATOL, rtol=1e-5)


def test_a_fully_padded_first_block_does_not_give_nan():
    cache, q = _filled("fp8_tensor", 1, 2, 1, 16, 100, seed=0, pad=False)
    cache.key_mask[0, :80] = False  # the first two blocks of 32 see nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tri = decode_attention_triton(q, cache, 0, block_n=32)
    ref = decode_attention_reference(q, cache, 0)
    assert bool(torch.isfinite(tri).all())
    torch.testing.assert_close(tri, ref, atol=ATOL, rtol=1e-5)


def test_fp8_cache_error_is_fp8_sized():
    """Over the FP8 cache the output differs from the high-precision one by e4m3 rounding, not more."""
    hp, q = _filled("hp", 2, 4, 2, 32, 50, seed=7)
    fp8, _ = _filled("fp8_head", 2, 4, 2, 32, 50, seed=7)
    exact = decode_attention_reference(q, hp, 0)
    approx = decode_attention_torch(q, fp8, 0)
    rel = float((approx - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.1


def test_decode_attention_rejects_bad_inputs():
    cache, q = _filled("fp8_tensor", 2, 4, 2, 16, 5, seed=1)
    with pytest.raises(ValueError, match=r"q must be a float tensor \[2, H, 16\]"):
        decode_attention(q[:, :3], cache, 0)
    with pytest.raises(ValueError, match="q must be a float tensor"):
        decode_attention(q[None], cache, 0)
    with pytest.raises(ValueError, match="layer must be an int"):
        decode_attention(q, cache, 1)
    with pytest.raises(ValueError, match="cache must be a KVCache or Fp8KVCache"):
        decode_attention(q, object(), 0)
    empty = Fp8KVCache(1, 2, 4, 2, 16, n_head=4)
    with pytest.raises(ValueError, match="empty"):
        decode_attention(q, empty, 0)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, cache, 0, backend="cuda")


def test_widen_fp8_codes_is_exact_for_every_finite_code():
    from helpers.kvcache.attention import WIDEN_FACTOR, widen_fp8_codes

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~torch.isnan(codes.float())
    widened = widen_fp8_codes(codes.reshape(4, 64)).reshape(-1)
    assert widened.dtype == torch.float32
    assert torch.equal(widened[finite] * WIDEN_FACTOR, codes.float()[finite])  # subnormals and -0 included
    assert torch.equal(torch.signbit(widened[finite]), torch.signbit(codes.float()[finite]))
