"""Clipped surrogate and veRL's aggregation modes (helpers/rl/losses.py) against direct loops."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.rl import losses
from helpers.rl import rollout_correction as rc

SHAPES = [(1, 1), (3, 7), (5, 83), (4, 2)]


def _inputs(B, T, seed, all_masked_row=False):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(B, T, generator=g) * 3
    logp = (logp_old + 0.4 * torch.randn(B, T, generator=g)).clamp(max=0.0)  # log-probs are <= 0
    adv = torch.randn(B, T, generator=g) * 2
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if all_masked_row and B > 1:
        mask[-1] = 0  # a sequence whose every token was rejected
    nan = torch.full_like(logp, float("nan"))
    return torch.where(mask > 0, logp, nan), torch.where(mask > 0, logp_old, -nan.abs()), adv, mask


def _direct_token_loss(logp, logp_old, adv, mask, lo, hi, c, w):
    B, T = logp.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            rho = math.exp(float(logp[b, t] - logp_old[b, t]))
            a = float(adv[b, t])
            term = max(-a * rho, -a * min(max(rho, 1 - lo), 1 + hi))
            if c is not None and a < 0:
                term = min(term, -a * c)
            out[b][t] = term * (1.0 if w is None else float(w[b, t]))
    return torch.tensor(out, dtype=torch.float64)


def _direct_agg(lm, mask, mode):
    B, T = lm.shape
    sums = [sum(float(lm[b, t]) for t in range(T) if mask[b, t] > 0) for b in range(B)]
    counts = [int(mask[b].sum()) for b in range(B)]
    if mode == "token-mean":
        return sum(sums) / max(sum(counts), 1)
    if mode == "seq-mean-token-sum":
        return sum(sums) / B
    if mode == "seq-mean-token-sum-norm":
        return sum(sums) / B / T
    means = [s / n for s, n in zip(sums, counts) if n > 0]
    return sum(means) / max(len(means), 1)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("lo,hi,c", [(0.2, None, None), (0.2, 0.28, None), (0.2, 0.28, 3.0), (0.1, 0.5, 10.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_clipped_surrogate_matches_direct(B, T, lo, hi, c, weighted):
    logp, logp_old, adv, mask = _inputs(B, T, seed=B * 100 + T)
    w = rc.is_weights(logp_old, (logp_old + 0.3).clamp(max=0.0), mask) if weighted else None
    lp = logp.clone().requires_grad_(True)
    lm, met = losses.clipped_surrogate(lp, logp_old, adv, mask, clip_low=lo, clip_high=hi, clip_c=c,
                                       rollout_weights=w)
    ref = _direct_token_loss(logp, logp_old, adv, mask, lo, lo if hi is None else hi, c, w)
    torch.testing.assert_close(lm.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 exp vs float64 math.exp
    lm.sum().backward()
    assert bool(torch.isfinite(lp.grad).all()) and bool((lp.grad[mask == 0] == 0).all())
    assert set(met) == {"clipfrac", "clipfrac_dual", "ppo_kl"} and all(v.dim() == 0 for v in met.values())
    sel = mask > 0
    ppo_kl = float((logp_old - logp)[sel].double().mean())
    assert float(met["ppo_kl"]) == pytest.approx(ppo_kl, rel=1e-5, abs=1e-6)


def test_clip_fractions_hand_made():
    # rho = 2, 0.5, 1.1 and 2 with advantages +1, -1, +1, -4
    logp_old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.1, 2.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -4.0]])
    m = torch.ones(1, 4)
    lm, met = losses.clipped_surrogate(logp, logp_old, adv, m, clip_low=0.2, clip_high=0.28, clip_c=1.5)
    # token 0: A>0, rho 2 clipped to 1.28 -> -1.28; token 1: A<0, rho 0.5 -> max(0.5, 0.8) = 0.8;
    # token 2: inside the range -> -1.1; token 3: A<0, max(8, 4*1.28) = 8, dual clip min(8, 4*1.5) = 6.
    torch.testing.assert_close(lm, torch.tensor([[-1.28, 0.8, -1.1, 6.0]]))
    assert float(met["clipfrac"]) == pytest.approx(0.5)  # tokens 0 and 1
    assert float(met["clipfrac_dual"]) == pytest.approx(0.25)  # token 3


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("mode", sorted(losses.AGG_MODES))
@pytest.mark.parametrize("all_masked_row", [False, True])
def test_agg_loss_matches_direct(B, T, mode, all_masked_row):
    logp, logp_old, adv, mask = _inputs(B, T, seed=7 * B + T, all_masked_row=all_masked_row)
    lm, _ = losses.clipped_surrogate(logp, logp_old, adv, mask)
    lm = torch.where(mask > 0, lm, torch.full_like(lm, float("nan")))  # padding never read
    got = losses.agg_loss(lm, mask, mode)
    assert float(got) == pytest.approx(_direct_agg(lm, mask, mode), rel=1e-5, abs=1e-6)


def test_agg_modes_differ_by_length_weighting_and_scale_factor():
    lm = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(losses.agg_loss(lm, m, "token-mean")) == pytest.approx(8 / 5)
    assert float(losses.agg_loss(lm, m, "seq-mean-token-sum")) == pytest.approx(4.0)
    assert float(losses.agg_loss(lm, m, "seq-mean-token-mean")) == pytest.approx(2.5)
    assert float(losses.agg_loss(lm, m, "seq-mean-token-sum-norm")) == pytest.approx(1.0)
    assert float(losses.agg_loss(lm, m, "seq-mean-token-sum-norm", loss_scale_factor=8)) == pytest.approx(0.5)
    assert float(losses.agg_loss(lm, torch.zeros_like(m), "seq-mean-token-mean")) == 0.0


def test_policy_loss_is_surrogate_plus_token_mean():
    logp, logp_old, adv, mask = _inputs(5, 9, seed=3)
    w = rc.is_weights(logp_old, logp_old - 0.5, mask)
    lm, _ = losses.clipped_surrogate(logp, logp_old, adv, mask, rollout_weights=w)
    assert torch.equal(rc.policy_loss(logp, logp_old, adv, mask, rollout_weights=w), losses.agg_loss(lm, mask))


def test_sequence_advantages_broadcast():
    logp, logp_old, _, mask = _inputs(3, 6, seed=5)
    adv_seq = torch.tensor([1.0, -0.5, 2.0])
    a, _ = losses.clipped_surrogate(logp, logp_old, adv_seq, mask)
    b, _ = losses.clipped_surrogate(logp, logp_old, adv_seq[:, None].expand(3, 6), mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [
    dict(clip_low=0.0), dict(clip_high=-0.1), dict(clip_c=1.0), dict(clip_c=0.5),
    dict(rollout_weights=torch.ones(2, 3)), dict(advantages=torch.ones(3)), dict(mask=torch.ones(2)),
    dict(logp_old=torch.zeros(2, 5)),
])
def test_surrogate_bad_inputs(kw):
    args = dict(logp=torch.zeros(2, 4), logp_old=torch.zeros(2, 4), advantages=torch.ones(2, 4), mask=torch.ones(2, 4))
    args.update(kw)
    with pytest.raises(ValueError):
        losses.clipped_surrogate(args.pop("logp"), args.pop("logp_old"), args.pop("advantages"), args.pop("mask"),
                                 **args)


@pytest.mark.parametrize("kw", [
    dict(mode="token-sum"), dict(mask=torch.ones(2, 5)), dict(loss_scale_factor=4.0),
    dict(mode="seq-mean-token-sum-norm", loss_scale_factor=0.0),
])
def test_agg_bad_inputs(kw):
    args = dict(loss_mat=torch.zeros(2, 4), mask=torch.ones(2, 4), mode="token-mean")
    args.update(kw)
    with pytest.raises(ValueError):
        losses.agg_loss(args.pop("loss_mat"), args.pop("mask"), args.pop("mode"), **args)
