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


def _toy_batch(n=64, T=5, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(4, 3, generator=g)
    pi = mt.log_policy(theta)
    mu = mt.log_policy(mt.perturb_logits(theta, "gaussian", scale, g))
    x = mt.sample_sequences(mu, n, T, g)
    prev, cur = x[:, :-1], x[:, 1:]
    adv = torch.randn(n, generator=g)
    return pi[prev, cur], mu[prev, cur], torch.ones(n, T), adv


def test_bypass_ppo_clip_coefficients_are_a_rho_where_unclipped():
    lt, lr, m, adv = _toy_batch()
    c = mt.estimator_coefficients(mt.ESTIMATORS["bypass_ppo_clip"], lt, lr, m, adv)
    rho = (lt - lr).exp()
    a = adv[:, None].expand_as(rho)
    clipped = ((a > 0) & (rho > 1.2)) | ((a < 0) & (rho < 0.8))  # veRL's default clip 0.2, old := rollout
    assert bool(clipped.any()) and bool((~clipped).any())
    torch.testing.assert_close(c, torch.where(clipped, torch.zeros_like(rho), a * rho))


def test_bypass_reinforce_equals_decoupled_sequence_tis_at_the_current_policy():
    lt, lr, m, adv = _toy_batch(seed=1)
    c_bypass = mt.estimator_coefficients(mt.ESTIMATORS["bypass_pg_is"], lt, lr, m, adv)
    c_seq = mt.estimator_coefficients(mt.ESTIMATORS["seq_tis"], lt, lr, m, adv)
    torch.testing.assert_close(c_bypass, c_seq)


def test_batch_normalised_coefficients_are_normalised_per_batch():
    lt, lr, m, adv = _toy_batch(n=40, seed=2)
    c = mt.estimator_coefficients(mt.ESTIMATORS["token_tis_bn"], lt, lr, m, adv, batch_size=16)
    w = (lt - lr).exp().clamp(max=2.0)
    for sl in (slice(0, 16), slice(16, 32), slice(32, 40)):  # the last batch is partial
        torch.testing.assert_close(c[sl], w[sl] / w[sl].mean() * adv[sl, None])


def test_geo_and_k3_rejection_coefficients():
    lt, lr, m, adv = _toy_batch(seed=3, scale=0.2)
    lrat = lt - lr
    keep_k3 = ((lrat.exp() - 1 - lrat).mean(-1) <= 0.01).float()[:, None]
    assert 0 < float(keep_k3.mean()) < 1  # the case rejects some sequences and keeps others
    got_k3 = mt.estimator_coefficients(mt.ESTIMATORS["k3_rs"], lt, lr, m, adv)
    torch.testing.assert_close(got_k3, (keep_k3 * adv[:, None]).expand_as(got_k3))
    k1 = (-lrat).mean(-1)  # veRL's seq_mean_k1 statistic, kept in [log 0.999, log 1.001]
    keep_geo = (k1 >= math.log(0.999)) & (k1 <= math.log(1.001))
    got = mt.estimator_coefficients(mt.ESTIMATORS["geo_rs"], lt, lr, m, adv)
    assert torch.equal(got != 0, keep_geo[:, None].expand_as(got) & (adv[:, None] != 0))


def test_study_cosines():
    theta = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    reward = torch.tensor([1.0, 0.0, 0.5])
    df = mt.estimator_study(theta, reward, lengths=[2], perturbations=[("gaussian", 0.1)], n_samples=4096, seed=1,
                            batch_size=256)
    assert df["cos_mean"].between(-1, 1).all() and df["cos_batch"].between(-1, 1).all()
    d = df.set_index("estimator")
    # unbiased, with 4096 samples the mean estimate points along the exact gradient
    assert d.loc["seq_is", "cos_mean"] > 0.95
    assert d.loc["seq_is", "cos_batch"] < d.loc["seq_is", "cos_mean"]  # one batch of 256 is noisier than 4096
