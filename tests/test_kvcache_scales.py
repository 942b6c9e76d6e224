"""compute_qkv_scales and the named policies: the formulas against numpy, per tensor and per head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers  # noqa: F401
from helpers.fp8.format import SCALE_EPS
from helpers.kvcache import POLICIES, KVScales, compute_qkv_scales, get_policy
from helpers.kvcache.scales import percentile_abs, reduce_over_batches


def _qkv(b=2, h=4, hkv=2, t=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g) * 3, torch.randn(b, hkv, t, d, generator=g),
            torch.randn(b, hkv, t, d, generator=g) * 0.1)


@pytest.mark.parametrize("percentile", [100.0, 99.9, 99.0, 50.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 2, 83, 16)])
def test_percentile_abs_matches_numpy(percentile, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = percentile_abs(x, percentile)
    want = np.percentile(x.abs().numpy().astype(np.float64), percentile)
    assert got.shape == () and float(got) == pytest.approx(want, rel=1e-6)
    per_head = percentile_abs(x, percentile, dim=1)
    assert per_head.shape == (shape[1],)
    for h in range(shape[1]):
        assert float(per_head[h]) == pytest.approx(np.percentile(x[:, h].abs().numpy(), percentile), rel=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_amax_scales_exact_formula(granularity):
    q, k, v = _qkv()
    qs, ks, vs = compute_qkv_scales(q, k, v, granularity=granularity)
    dims = (0, 2, 3)
    if granularity == "tensor":
        assert qs.shape == ks.shape == vs.shape == ()
        assert torch.equal(ks, k.abs().amax() / 448.0) and torch.equal(vs, v.abs().amax() / 448.0)
    else:
        assert qs.shape == (4,) and ks.shape == vs.shape == (2,)
        assert torch.equal(qs, q.abs().amax(dim=dims) / 448.0)
        assert torch.equal(ks, k.abs().amax(dim=dims) / 448.0)
    assert qs.dtype == ks.dtype == vs.dtype == torch.float32


def test_margin_percentile_and_vllm_divisors():
    q, k, v = _qkv(seed=3)
    qs, ks, vs = compute_qkv_scales(q, k, v, percentile=99.9, margin=1.05)
    assert float(ks) == pytest.approx(1.05 * np.percentile(k.abs().numpy(), 99.9) / 448.0, rel=1e-6)
    qs, ks, vs = compute_qkv_scales(q, k, v, fp8_max=(200.0, 200.0, 100.0))  # vLLM's constants
    assert torch.equal(qs, q.abs().amax() / 200.0) and torch.equal(vs, v.abs().amax() / 100.0)
    zero = torch.zeros(1, 2, 3, 4)
    _, kz, _ = compute_qkv_scales(zero, zero, zero)
    assert float(kz) == pytest.approx(SCALE_EPS / 448.0)  # floored, finite, > 0


@pytest.mark.parametrize("kw, match", [
    ({"granularity": "channel"}, "granularity"),
    ({"percentile": 0.0}, "percentile"),
    ({"percentile": 100.5}, "percentile"),
    ({"margin": 0.0}, "margin"),
    ({"fp8_max": (1.0, 2.0)}, "fp8_max"),
    ({"fp8_max": -1.0}, "fp8_max"),
])
def test_compute_qkv_scales_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        compute_qkv_scales(*_qkv(), **kw)


def test_compute_qkv_scales_rejects_bad_tensors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be a float tensor \[B, heads, T, D\]"):
        compute_qkv_scales(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        compute_qkv_scales(q, k, v[:, :1])
    with pytest.raises(ValueError, match="k must be a float tensor"):
        compute_qkv_scales(q, k.long(), v)


def test_presets_are_the_published_ones():
    assert POLICIES["unit"].schedule == "never"
    vllm = get_policy("vllm")
    assert vllm.fp8_max == (200.0, 200.0, 100.0) and vllm.first_batch_only and vllm.schedule == "once"
    nemo = get_policy("nemo_rl")
    assert nemo.margin == 1.05 and nemo.fp8_max == (448.0,) * 3 and nemo.schedule == "every_step"
    assert nemo.batch_percentile == 99.9 and nemo.percentile == 100.0
    assert get_policy("nemo_rl_once").schedule == "once"
    assert get_policy("p99.9").percentile == 99.9 and get_policy("p99.99").percentile == 99.99
    with pytest.raises(ValueError, match="policy must be one of"):
        get_policy("fp8")


def test_reduce_over_batches():
    stats = [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0]), torch.tensor([2.0, 4.0])]
    assert torch.equal(reduce_over_batches(stats), torch.tensor([3.0, 5.0]))
    got = reduce_over_batches(stats, 99.9)  # numpy's linear interpolation over the 3 batch values
    want = np.percentile(np.stack([s.numpy() for s in stats]), 99.9, axis=0)
    torch.testing.assert_close(got, torch.from_numpy(want).float())
    with pytest.raises(ValueError, match="at least one"):
        reduce_over_batches([])


def test_kv_scales_state_dict_names_and_round_trip():
    s = KVScales(torch.rand(3, 4) + 0.1, torch.rand(3, 2) + 0.1, torch.rand(3, 2) + 0.1)
    sd = s.state_dict()
    assert set(sd) == {f"layers.{i}.self_attn.{n}_scale" for i in range(3) for n in ("q", "k", "v")}
    assert sd["layers.2.self_attn.k_scale"].shape == (2,) and sd["layers.0.self_attn.q_scale"].shape == (4,)
    back = KVScales.from_state_dict(sd)
    assert torch.equal(back.q, s.q) and torch.equal(back.k, s.k) and torch.equal(back.v, s.v)
    assert back.granularity == "head" and KVScales.unit(2).granularity == "tensor"
    del sd["layers.1.self_attn.v_scale"]
    with pytest.raises(ValueError, match="no layers.1.self_attn.v_scale"):
        KVScales.from_state_dict(sd)
    with pytest.raises(ValueError, match="no layers.0.self_attn.k_scale"):
        KVScales.from_state_dict({})


def test_kv_scales_compare_with_eq_and_equal():
    a = KVScales(torch.ones(2), torch.full((2,), 0.5), torch.full((2,), 0.25))
    b = KVScales(torch.ones(2), torch.full((2,), 0.5), torch.full((2,), 0.25))
    c = KVScales(torch.ones(2), torch.full((2,), 0.5), torch.tensor([0.25, 0.3]))
    head = KVScales(torch.ones(2, 4), torch.ones(2, 2), torch.ones(2, 2))
    assert a == b and a.equal(b) and not (a != b)
    assert a != c and not a.equal(c)
    assert a != head and not a.equal(head)  # different shapes: False, no broadcasting error
    assert a != "scales" and not a.equal(None)
