"""Fp8KVCache: satfinite writes, dequantizing reads, scale shapes, the FP8-query arm, bytes, and bad scales."""

from __future__ import annotations

import pytest
import torch

import helpers  # noqa: F401
from helpers.fp8.format import FP8_E4M3_MAX
from helpers.kvcache import Fp8KVCache, KVCache, KVScales, compute_qkv_scales
from helpers.models import Decoder, DecoderConfig

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: round to nearest is within half an ulp, 2**-4 relative, for normal codes (|code| >= 2**-6).
E4M3_REL = 2.0 ** -4


def _kv(shape=(2, 3, 5, 16), seed=0, spread=None):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if spread is not None:  # one head much larger than the others
        k[:, 0] *= spread
    return k, v


def _scales_for(k, v, n_layer, n_head, granularity):
    q = torch.randn(k.shape[0], n_head, k.shape[2], k.shape[3])
    qs, ks, vs = compute_qkv_scales(q, k, v, granularity=granularity)
    return KVScales(qs.expand(n_layer, *qs.shape).clone(), ks.expand(n_layer, *ks.shape).clone(),
                    vs.expand(n_layer, *vs.shape).clone())


@pytest.mark.parametrize("granularity", ["tensor", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_is_satfinite_cast_and_read_dequantizes(granularity, dtype):
    k, v = _kv(spread=30.0)
    k, v = k.to(dtype), v.to(dtype)
    cache = Fp8KVCache(2, 2, 9, 3, 16, n_head=6, granularity=granularity, scales=_scales_for(k, v, 2, 6, granularity))
    cache.append(1, k, v)
    sk = cache.k_scale[1] if granularity == "tensor" else cache.k_scale[1][:, None, None]
    expect = (k.float() / sk).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)
    assert torch.equal(cache.k[1, :, :, :5].view(torch.uint8), expect.view(torch.uint8))  # bit-exact codes
    rk, rv = cache.read(1)
    assert rk.dtype == torch.float32 and torch.equal(rk, expect.float() * sk)
    # amax scales: nothing saturates, every code is within half an ulp (plus the subnormal step 2**-9 * scale).
    assert cache.saturation_metrics()["k_saturated_fraction"] == 0.0
    assert bool(((rk - k.float()).abs() <= E4M3_REL * k.float().abs() + 2.0 ** -10 * sk).all())
    if granularity == "head":  # the small heads keep their own resolution
        small = (rk[:, 1:] - k.float()[:, 1:]).abs().max()
        assert float(small) < 0.1 * float((rk[:, :1] - k.float()[:, :1]).abs().max())


def test_unit_scale_saturates_large_values_and_counts_them():
    cache = Fp8KVCache(1, 1, 4, 1, 4, n_head=1)
    k = torch.tensor([[[[1000.0, -500.0, 448.0, 3.0], [0.5, -463.0, 2.0, 464.0]]]])  # [1, 1, 2, 4]
    v = torch.ones(1, 1, 2, 4)
    cache.append(0, k, v)
    rk, _ = cache.read(0)
    assert rk[0, 0, 0].tolist() == [448.0, -448.0, 448.0, 3.0]  # clipped to +-448, never NaN
    assert rk[0, 0, 1, 1].item() == -448.0 and rk[0, 0, 1, 3].item() == 448.0
    m = cache.saturation_metrics()
    # 1000, -500 and 464 are clipped; -463 rounds to -448 anyway (below the 464 midpoint), 448 is exact.
    assert m["k_saturated_fraction"] == pytest.approx(3 / 8) and m["v_saturated_fraction"] == 0.0
    cache.reset()
    assert cache.saturation_metrics()["k_saturated_fraction"] == 0.0


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_set_scales_rejects_wrong_shapes_and_keeps_the_old_ones(granularity):
    cache = Fp8KVCache(3, 2, 8, 2, 8, n_head=4, granularity=granularity)
    good = KVScales.unit(3, n_head=4, n_kv_head=2, granularity=granularity)
    good.k.mul_(0.5)
    cache.set_scales(good)
    before = cache.scales()
    other = "head" if granularity == "tensor" else "tensor"
    bad = [KVScales.unit(3, n_head=4, n_kv_head=2, granularity=other), KVScales.unit(2, n_head=4, n_kv_head=2,
                                                                                   granularity=granularity)]
    if granularity == "head":
        bad.append(KVScales(torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 2)))  # q per KV head, not per head
    for scales in bad:
        with pytest.raises(ValueError, match=r"scales\.\w must have shape"):
            cache.set_scales(scales)
        assert torch.equal(cache.k_scale, before.k) and torch.equal(cache.q_scale, before.q)
    with pytest.raises(ValueError, match="scales must be a KVScales"):
        cache.set_scales({"k": torch.ones(3)})


@pytest.mark.parametrize("bad, match", [
    ({"k": torch.tensor([1.0, 0.0])}, "finite and > 0"),
    ({"v": torch.tensor([1.0, float("nan")])}, "finite and > 0"),
    ({"q": torch.ones(3)}, "same layers"),
    ({"v": torch.ones(2, 2)}, "one shape"),
    ({"k": torch.ones(2, 2, 2)}, r"\[n_layer\] or \[n_layer, heads\]"),
])
def test_kv_scales_reject_bad_values(bad, match):
    args = {"q": torch.ones(2), "k": torch.ones(2), "v": torch.ones(2), **bad}
    with pytest.raises(ValueError, match=match):
        KVScales(**args)


def test_bad_construction():
    with pytest.raises(ValueError, match="granularity"):
        Fp8KVCache(1, 1, 4, 2, 8, n_head=4, granularity="channel")
    with pytest.raises(ValueError, match="n_head must be a positive multiple"):
        Fp8KVCache(1, 1, 4, 2, 8, n_head=3)
    with pytest.raises(ValueError, match="dtype"):
        Fp8KVCache(1, 1, 4, 2, 8, n_head=4, dtype=FP8)


def test_fp8_query_rounds_q_through_e4m3_with_its_scale():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 3, 8, generator=g) * 5
    plain = Fp8KVCache(1, 2, 4, 2, 8, n_head=4)
    assert plain.prepare_query(0, q) is q
    scales = KVScales(torch.full((1, 4), 0.01), torch.ones(1, 2), torch.ones(1, 2))
    cache = Fp8KVCache(1, 2, 4, 2, 8, n_head=4, granularity="head", fp8_query=True, scales=scales)
    got = cache.prepare_query(0, q)
    assert torch.equal(got, (q / 0.01).clamp(-448, 448).to(FP8).float() * 0.01)
    assert bool((got != q).any())
    assert bool((got.abs() <= 448 * 0.01 + 1e-6).all())  # |q| > 4.48 saturates at 448 codes


def test_storage_is_half_of_bf16_plus_the_scales():
    for granularity, n_scales in (("tensor", 3 * 4), ("head", 4 * (8 + 2 + 2))):
        fp8 = Fp8KVCache(4, 3, 100, 2, 64, n_head=8, granularity=granularity)
        bf16 = KVCache(4, 3, 100, 2, 64, dtype=torch.bfloat16)
        assert fp8.storage_bytes == bf16.storage_bytes // 2 + 4 * n_scales
        assert bf16.bytes_per_token() == 2 * 4 * 2 * 64 * 2


def test_decoder_generates_with_the_fp8_cache_close_to_high_precision():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=32,
                                  d_ff=64, max_seq_len=32)).eval()
    prompt = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    hp = model.generate(prompt, 10, temperature=0.0)
    cache = Fp8KVCache.from_config(model.cfg, 4, 16)
    ptr = cache.k.data_ptr()
    out = model.generate(prompt, 10, temperature=0.0, cache=cache)
    assert cache.k.data_ptr() == ptr and cache.lengths == [15, 15]
    # Greedy tokens of an untrained model have near-ties; most agree, log-probs stay within FP8 noise.
    assert float((out.tokens == hp.tokens).float().mean()) >= 0.7
    assert float((out.logprobs - hp.logprobs)[:, 0].abs().max()) < 0.05  # first token: same prefix for sure
