"""The cache interface: appends, lengths and key mask, and every bad append (cache left unchanged)."""

from __future__ import annotations

import pytest
import torch

import helpers  # noqa: F401
from helpers.kvcache import Fp8KVCache, KVCache, causal_key_mask


_KINDS = {
    "hp": lambda: KVCache(2, 3, 10, 2, 8),
    "fp8_tensor": lambda: Fp8KVCache(2, 3, 10, 2, 8, n_head=4),
    "fp8_head": lambda: Fp8KVCache(2, 3, 10, 2, 8, n_head=4, granularity="head"),
}


def _snapshot(cache):
    def raw(t):
        return t.view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.clone()
    return (raw(cache.k), raw(cache.v), cache.key_mask.clone(), list(cache.lengths))


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_append_advances_the_layer_and_records_the_mask(kind):
    cache = _KINDS[kind]()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 4, 8, generator=g)
    mask = torch.tensor([[True] * 4, [False, True, True, True], [False, False, True, True]])
    cache.append(0, k, v, mask)
    assert cache.lengths == [4, 0] and cache.length == 0
    cache.append(1, k, v, mask)
    assert cache.lengths == [4, 4] and cache.length == 4
    assert torch.equal(cache.key_mask[:, :4], mask) and not bool(cache.key_mask[:, 4:].any())
    rk, rv = cache.read(1)
    assert rk.shape == rv.shape == (3, 2, 4, 8)
    if isinstance(cache, KVCache):
        assert torch.equal(rk, k) and torch.equal(rv, v)  # high precision: bit-exact
    cache.append(1, k[:, :, :1], v[:, :, :1])  # mask None = real tokens
    assert bool(cache.key_mask[:, 4].all()) and cache.lengths == [4, 5]
    cache.reset()
    assert cache.lengths == [0, 0] and not bool(cache.key_mask.any())


@pytest.mark.parametrize("kind", sorted(_KINDS))
@pytest.mark.parametrize("case, match", [
    ("past_capacity", "append of 7 tokens to layer 0 at length 4 exceeds the cache's max_len=10"),
    ("bad_layer", "layer must be an int in"),
    ("k_shape", r"k must have shape \[3, 2, T, 8\]"),
    ("v_shape", r"v must have shape .* with T=4"),
    ("k_dtype", "k must"),
    ("not_tensor", "k must be a torch.Tensor"),
    ("mask_shape", r"mask must be a bool tensor \[3, 4\]"),
    ("mask_dtype", "mask must be a bool tensor"),
])
def test_bad_append_raises_and_leaves_the_cache_unchanged(kind, case, match):
    cache = _KINDS[kind]()
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 4, 8, generator=g)
    cache.append(0, k, v)  # 4 of 10 slots used
    before = _snapshot(cache)
    layer, mask = 0, None
    if case == "past_capacity":
        k, v = torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    elif case == "bad_layer":
        layer = 2
    elif case == "k_shape":
        k = torch.randn(3, 4, 4, 8)
    elif case == "v_shape":
        v = torch.randn(3, 2, 3, 8)
    elif case == "k_dtype":  # fp8 input to the FP8 cache (it quantizes itself), fp64 to an fp32 cache
        k = k.double() if kind == "hp" else k.to(torch.float8_e4m3fn)
    elif case == "not_tensor":
        k = k.tolist()
    elif case == "mask_shape":
        mask = torch.ones(3, 3, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(3, 4)
    with pytest.raises(ValueError, match=match):
        cache.append(layer, k, v, mask)
    assert _same(_snapshot(cache), before)


def test_hp_cache_rejects_bad_construction():
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        KVCache(2, 3, 0, 2, 8)
    with pytest.raises(ValueError, match="dtype"):
        KVCache(2, 3, 4, 2, 8, dtype=torch.float8_e4m3fn)


def test_causal_key_mask():
    key_mask = torch.tensor([[False, True, True, True, True]])
    m = causal_key_mask(key_mask, 2)  # queries are slots 3 and 4
    assert m.shape == (1, 2, 5)
    assert m[0, 0].tolist() == [False, True, True, True, False]
    assert m[0, 1].tolist() == [False, True, True, True, True]
    pad_query = causal_key_mask(torch.tensor([[True, False]]), 1)  # a padding query sees its own slot
    assert pad_query[0, 0].tolist() == [True, True]
