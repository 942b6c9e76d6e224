"""Tests for helpers.estimators.markov: the exact gradient, sampling, FP8 rounding and the estimator study."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.estimators import markov as mt


@pytest.mark.parametrize("V,T", [(2, 1), (3, 2), (3, 4), (4, 3)])
def test_exact_objective_and_gradient_match_enumeration(V, T):
    g = torch.Generator().manual_seed(V * 10 + T)
    theta = torch.randn(V + 1, V, generator=g, dtype=torch.float64)
    reward = torch.rand(V, generator=g, dtype=torch.float64)
    th = theta.clone().requires_grad_(True)
    brute = mt.brute_force_objective(th, reward, T)
    (g_brute,) = torch.autograd.grad(brute, th)
    # float64 on both sides: the recursion and the enumeration are the same sum in another order
    torch.testing.assert_close(mt.exact_objective(theta, reward, T), brute.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mt.exact_gradient(theta, reward, T), g_brute, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1, 5, 16])
def test_on_policy_estimator_is_unbiased(T):
    """With no mismatch every untruncated estimator reduces to REINFORCE: its mean over n sequences must lie within
    5 standard errors of the exact gradient in every component (a 5-sigma band: a false failure has probability
    ~1e-5 per component, and the test is seeded so it is deterministic anyway)."""
    V, n = 3, 40_000
    g = torch.Generator().manual_seed(T)
    theta = torch.randn(V + 1, V, generator=g)
    reward = torch.tensor([1.0, 0.2, 0.0])
    logp = mt.log_policy(theta)
    x = mt.sample_sequences(logp, n, T, g)
    adv = mt.sequence_rewards(x, reward) - mt.exact_objective(theta, reward, T)
    G = mt.per_sample_gradients(x, adv[:, None].expand(n, T), logp)
    mean, se = G.mean(0), G.std(0) / math.sqrt(n)
    exact = mt.exact_gradient(theta, reward, T)
    assert bool(((mean - exact).abs() <= 5 * se + 1e-6).all())


def test_per_sample_gradient_matches_autograd():
    V, T = 3, 4
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(V + 1, V, generator=g)
    x = mt.sample_sequences(mt.log_policy(theta), 5, T, g)
    coef = torch.rand(5, T, generator=g)
    G = mt.per_sample_gradients(x, coef, mt.log_policy(theta))
    for i in range(5):
        th = theta.clone().requires_grad_(True)
        lp = mt.log_policy(th)[x[i, :-1], x[i, 1:]]
        (gi,) = torch.autograd.grad((coef[i] * lp).sum(), th)
        torch.testing.assert_close(G[i], gi, rtol=1e-5, atol=1e-6)


def test_sampling_frequencies():
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(3, 2, generator=g)
    x = mt.sample_sequences(mt.log_policy(theta), 50_000, 1, g)
    p = torch.softmax(theta[2], -1)
    freq = torch.bincount(x[:, 1], minlength=2).float() / 50_000
    assert bool(((freq - p).abs() < 5 * (p * (1 - p) / 50_000).sqrt()).all())  # 5-sigma binomial band


@pytest.mark.parametrize("block", [None, (16, 16), (3, 2)])
def test_fp8_round(block):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=g) * 3
    q = mt.fp8_round(x, block)
    if block is None:
        s = x.abs().max() / 448
        torch.testing.assert_close(q, (x / s).to(torch.float8_e4m3fn).float() * s)
    assert bool(((q - x).abs() <= x.abs() / 16 + 1e-6).all())  # e4m3: 3 mantissa bits, relative error <= 2^-4
    torch.testing.assert_close(mt.fp8_round(q, block), q)  # rounding is idempotent


def test_study_is_seeded_and_shaped():
    theta = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    reward = torch.tensor([1.0, 0.0, 0.5])
    kw = dict(lengths=[1, 3], perturbations=[("gaussian", 0.2), ("fp8", 1.0)], n_samples=500, seed=4)
    a, b = mt.estimator_study(theta, reward, **kw), mt.estimator_study(theta, reward, **kw)
    assert a.equals(b) and len(a) == 2 * 2 * len(mt.ESTIMATORS)
    t1 = a[a["T"] == 1].set_index(["perturbation", "estimator"])["rel_bias"]
    # at T = 1 a sequence is one token: the three levels give the same weights, hence the same estimate
    for p in ("gaussian", "fp8"):
        assert t1[(p, "token_tis")] == t1[(p, "seq_tis")] == t1[(p, "geo_tis")]
        assert t1[(p, "token_mis")] == t1[(p, "seq_mis")]
