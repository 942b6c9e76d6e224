"""Tests for helpers.rl.rollout_correction: every function against direct computations, and every bad input."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.rl import rollout_correction as rc


def _inputs(B: int, T: int, seed: int, scale: float = 0.5, pad: bool = True):
    """Random log-probs and a right-padded mask (each row keeps at least one token); padding holds NaN/-inf to
    check it is never read."""
    g = torch.Generator().manual_seed(seed)
    lt = -torch.rand(B, T, generator=g) * 3
    lr = (lt + scale * torch.randn(B, T, generator=g)).clamp(max=0.0)  # log-probs are <= 0
    mask = torch.ones(B, T)
    if pad:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
        lt = torch.where(mask > 0, lt, torch.full_like(lt, float("nan")))
        lr = torch.where(mask > 0, lr, torch.full_like(lr, -float("inf")))
    return lt, lr, mask


def _direct_ratio(lt, lr, mask, level):
    """Per-token ratio at ``level`` by explicit Python loops (the reference)."""
    B, T = lt.shape
    out = torch.zeros(B, T)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        d = [max(min(float(lt[b, t] - lr[b, t]), 20.0), -20.0) for t in idx]
        for j, t in enumerate(idx):
            if level == "token":
                out[b, t] = math.exp(d[j])
            elif level == "sequence":
                out[b, t] = math.exp(max(min(sum(d), 20.0), -20.0))
            else:
                out[b, t] = math.exp(sum(d) / len(d))
    return out


SHAPES = [(1, 1), (3, 7), (5, 83), (2, 1)]


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("threshold", [0.5, 2.0, math.inf])
def test_is_weights_match_direct(B, T, level, threshold):
    lt, lr, mask = _inputs(B, T, seed=B * 100 + T, scale=0.1 if level == "sequence" else 0.5)
    w = rc.is_weights(lt, lr, mask, level=level, threshold=threshold)
    ref = _direct_ratio(lt, lr, mask, level).clamp(max=threshold) * mask
    # fp32 exp/sum vs Python float64: a few ulp
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    assert not w.requires_grad and bool((w[mask == 0] == 0).all())


def test_is_weights_hand_made():
    lt = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    lr = torch.log(torch.tensor([[0.25, 0.4, 0.9]]))  # ratios 2, 0.5, 1
    m = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(rc.is_weights(lt, lr, m, level="token", threshold=1.5), torch.tensor([[1.5, 0.5, 0.0]]))
    torch.testing.assert_close(rc.is_weights(lt, lr, m, level="sequence"), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(rc.is_weights(lt, lr, m, level="geometric"), torch.tensor([[1.0, 1.0, 0.0]]))


def test_log_ratio_clamped():
    lt = torch.tensor([[0.0, -100.0]])
    lr = torch.tensor([[-100.0, 0.0]])
    w = rc.is_weights(lt, lr, torch.ones(1, 2), threshold=math.inf)
    torch.testing.assert_close(w, torch.tensor([[math.exp(20.0), math.exp(-20.0)]]))


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("lower,upper", [(None, 2.0), (0.8, 1.1), (0.1, 0.1)])
def test_rejection_mask_matches_direct(B, T, level, lower, upper):
    lt, lr, mask = _inputs(B, T, seed=7 * B + T, scale=0.1 if level == "sequence" else 0.5)
    kept = rc.rejection_mask(lt, lr, mask, level=level, lower=lower, upper=upper)
    lo = 1 / upper if lower is None else lower
    r = _direct_ratio(lt, lr, mask, level)
    # compare away from the bounds (log vs linear space may differ by an ulp exactly on a bound)
    ref = ((r >= lo) & (r <= upper)).float() * mask
    safe = ((r - lo).abs() > 1e-5) & ((r - upper).abs() > 1e-5)
    assert torch.equal(kept[safe], ref[safe])
    if level != "token":  # a sequence is kept or rejected as a whole
        for b in range(B):
            vals = kept[b][mask[b] > 0]
            assert bool((vals == vals[0]).all())


def test_rejection_mask_hand_made_and_veto():
    lt = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.5, 0.5, 0.5]]))
    lr = torch.log(torch.tensor([[0.25, 0.4, 0.9], [0.5, 0.5, 0.5]]))  # row 0 ratios 2, 0.5, 1
    m = torch.ones(2, 3)
    assert torch.equal(rc.rejection_mask(lt, lr, m, upper=1.5), torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(rc.rejection_mask(lt, lr, m, lower=0.4, upper=2.5), torch.ones(2, 3))
    veto_lt = lt.clone()
    veto_lt[1, 2] = math.log(1e-7)  # a token the trainer thinks near-impossible: r = 2e-7 < 1e-4
    vetoed = rc.rejection_mask(veto_lt, lr, m, lower=1e-9, upper=1e9, veto_threshold=1e-4)
    assert torch.equal(vetoed, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    stats = rc.rejection_metrics(m, vetoed)
    assert stats == {"rejected_fraction_token": 0.5, "rejected_fraction_sequence": 0.5}


@pytest.mark.parametrize("B,T", SHAPES)
def test_mismatch_metrics_match_direct(B, T):
    lt, lr, mask = _inputs(B, T, seed=B + 31 * T)
    got = rc.mismatch_metrics(lt, lr, mask, threshold=1.5)
    sel = mask > 0
    d = (lt - lr)[sel].double()
    r = d.exp()
    w = r.clamp(max=1.5)
    seq_lt = [lt[b][mask[b] > 0].double().mean() for b in range(B)]
    seq_lr = [lr[b][mask[b] > 0].double().mean() for b in range(B)]
    ref = {
        "kl": float((-d).mean()),
        "k3_kl": float((r - 1 - d).mean()),
        "token_mult_prob_error": float(d.abs().exp().mean()),
        "training_ppl": sum(math.exp(-x) for x in seq_lt) / B,
        "rollout_ppl": sum(math.exp(-x) for x in seq_lr) / B,
        "ppl_ratio": sum(math.exp(a - b) for a, b in zip(seq_lr, seq_lt)) / B,
        "chi2_token": float((r * r).mean() - 1),
        "is_weight_mean": float(w.mean()),
        "is_weight_std": float(w.std(unbiased=False)),
        "is_weight_min": float(w.min()),
        "is_weight_max": float(w.max()),
        "fraction_truncated": float((r > 1.5).double().mean()),
        "ess": float(w.mean() ** 2 / (w * w).mean()),
        "gen_kl_error": float((r - 1 - d).mean()),  # NeMo-RL: k3 with log_ratio = logp_train - logp_gen
        "policy_kl_error": float((1 / r - 1 + d).mean()),  # NeMo-RL: roles swapped
        "training_log_ppl": -sum(float(x) for x in seq_lt) / B,
        "rollout_log_ppl": -sum(float(x) for x in seq_lr) / B,
        "log_ppl_diff": sum(float(a - b) for a, b in zip(seq_lr, seq_lt)) / B,
        "chi2_seq": sum(math.exp(2 * float((lt[b] - lr[b])[mask[b] > 0].double().sum())) for b in range(B)) / B - 1,
    }
    assert set(got) == set(rc.MISMATCH_KEYS) and set(ref) == set(got)
    for k, v in ref.items():
        # fp32 accumulation vs float64 reference
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_mismatch_k1_uses_the_unclamped_log_ratio():
    # d = +-100 is far past LOG_RATIO_BOUND: k1 (no exp) must see all of it; k3 and the ratios stay clamped.
    lt = torch.tensor([[0.0, -100.0, -1.0]])
    lr = torch.tensor([[-100.0, 0.0, -3.0]])
    m = torch.tensor([[1.0, 1.0, 1.0]])
    got = rc.mismatch_metrics(lt, lr, m)
    assert got["kl"] == pytest.approx((-100.0 + 100.0 - 2.0) / 3)
    one_sided = rc.mismatch_metrics(lt[:, :1], lr[:, :1], m[:, :1])
    assert one_sided["kl"] == pytest.approx(-100.0)  # clamped, it would read -20
    assert one_sided["k3_kl"] == pytest.approx(math.exp(20.0) - 1 - 20.0, rel=1e-5)
    assert one_sided["token_mult_prob_error"] == pytest.approx(math.exp(20.0), rel=1e-5)


def test_mismatch_metrics_identical_policies():
    lt, _, mask = _inputs(4, 9, seed=3)
    got = rc.mismatch_metrics(lt, lt.clone(), mask)
    assert got["kl"] == 0 and got["k3_kl"] == 0 and got["chi2_token"] == 0
    assert got["token_mult_prob_error"] == 1
    assert got["ess"] == 1 and got["is_weight_mean"] == 1 and got["ppl_ratio"] == pytest.approx(1.0)


def _direct_policy_loss(logp, logp_old, adv, mask, w, clip):
    total, n = 0.0, 0.0
    B, T = logp.shape
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            rho = math.exp(float(logp[b, t] - logp_old[b, t]))
            a = float(adv[b, t])
            term = max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip))
            total += term * (1.0 if w is None else float(w[b, t]))
            n += 1
    return total / n


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_loss_matches_direct(B, T, with_weights):
    g = torch.Generator().manual_seed(B * T)
    logp_old, lr, mask = _inputs(B, T, seed=B * T + 1)
    logp = torch.where(mask > 0, (logp_old + 0.4 * torch.randn(B, T, generator=g)).clamp(max=0.0), logp_old)
    adv = torch.randn(B, T, generator=g)
    w = rc.is_weights(logp_old, lr, mask) if with_weights else None
    got = rc.policy_loss(logp.requires_grad_(True), logp_old, adv, mask, rollout_weights=w, clip=0.2)
    ref = _direct_policy_loss(logp.detach(), logp_old, adv, mask, w, 0.2)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    got.backward()
    assert bool(torch.isfinite(logp.grad).all()) and bool((logp.grad[mask == 0] == 0).all())


def test_policy_loss_sequence_advantages_broadcast_and_rejection_denominator():
    logp = torch.zeros(2, 3)
    adv_seq = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # rho = 1: loss_t = -A_t; mean over 3 kept tokens = (-1 - 1 + 2) / 3
    assert float(rc.policy_loss(logp, logp, adv_seq, mask)) == pytest.approx(0.0)
    kept = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # a rejected token leaves the denominator
    assert float(rc.policy_loss(logp, logp, adv_seq, kept)) == pytest.approx((-1 + 2) / 2)


def test_masked_mean():
    x = torch.tensor([[1.0, float("nan"), 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert float(rc.masked_mean(x, m)) == 2.0
    torch.testing.assert_close(rc.masked_mean(x, m, dim=-1), torch.tensor([2.0, 0.0]))


# -- bad inputs --------------------------------------------------------------------------------------------------
FUNCS = {
    "is_weights": lambda lt, lr, m, **kw: rc.is_weights(lt, lr, m, **kw),
    "rejection_mask": lambda lt, lr, m, **kw: rc.rejection_mask(lt, lr, m, **kw),
    "mismatch_metrics": lambda lt, lr, m, **kw: rc.mismatch_metrics(lt, lr, m, **kw),
    "policy_loss": lambda lt, lr, m, **kw: rc.policy_loss(lt, lr, torch.ones_like(lt), m, **kw),
}


@pytest.mark.parametrize("fname", list(FUNCS))
def test_bad_shapes_masks_and_values(fname):
    f = FUNCS[fname]
    lt, lr, m = _inputs(2, 4, seed=0, pad=False)
    with pytest.raises(ValueError, match="shape"):
        f(lt, lr[:, :3], m)
    with pytest.raises(ValueError, match="mask"):
        f(lt, lr, m[:, :3])
    with pytest.raises(ValueError, match="0 and 1"):
        f(lt, lr, m * 0.5)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        f(lt[0], lr[0], m[0])
    bad = lt.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        f(bad, lr, m)
    bad = lr.clone()
    bad[0, 0] = -float("inf")
    with pytest.raises(ValueError, match="finite"):
        f(lt, bad, m)


@pytest.mark.parametrize("kw,arg", [
    ({"threshold": 0.0}, "threshold"), ({"threshold": -1.0}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"level": "batch"}, "level"),
])
def test_bad_is_weights_args(kw, arg):
    lt, lr, m = _inputs(2, 4, seed=0)
    with pytest.raises(ValueError, match=arg):
        rc.is_weights(lt, lr, m, **kw)


@pytest.mark.parametrize("kw,arg", [
    ({"upper": 0.0}, "upper"), ({"lower": -0.5}, "lower"), ({"lower": 3.0, "upper": 2.0}, "lower"),
    ({"level": "seq"}, "level"), ({"veto_threshold": 0.0}, "veto_threshold"),
])
def test_bad_rejection_args(kw, arg):
    lt, lr, m = _inputs(2, 4, seed=0)
    with pytest.raises(ValueError, match=arg):
        rc.rejection_mask(lt, lr, m, **kw)


def test_bad_policy_loss_args():
    lt, lr, m = _inputs(2, 4, seed=0, pad=False)
    with pytest.raises(ValueError, match="clip"):
        rc.policy_loss(lt, lr, torch.ones(2, 4), m, clip=0.0)
    with pytest.raises(ValueError, match="advantages"):
        rc.policy_loss(lt, lr, torch.ones(3), m)
    with pytest.raises(ValueError, match="rollout_weights"):
        rc.policy_loss(lt, lr, torch.ones(2, 4), m, rollout_weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="threshold"):
        rc.mismatch_metrics(lt, lr, m, threshold=0)


def test_all_padding_is_harmless():
    lt = torch.full((2, 3), float("nan"))
    m = torch.zeros(2, 3)
    assert torch.equal(rc.is_weights(lt, lt, m, level="sequence"), torch.zeros(2, 3))
    assert torch.equal(rc.rejection_mask(lt, lt, m, level="geometric"), torch.zeros(2, 3))
    got = rc.mismatch_metrics(lt, lt, m)  # nothing to measure: NaN everywhere, never kl 0 beside chi2 -1
    assert set(got) == set(rc.MISMATCH_KEYS) and all(math.isnan(v) for v in got.values())
    assert rc.rejection_metrics(m, m) == {"rejected_fraction_token": 0.0, "rejected_fraction_sequence": 0.0}


def test_bool_mask_and_positive_logps_and_devices():
    lt, lr, m = _inputs(3, 5, seed=4, pad=False)
    torch.testing.assert_close(rc.is_weights(lt, lr, m.bool()), rc.is_weights(lt, lr, m))  # bool masks work
    with pytest.raises(ValueError, match=r"logp_rollout must hold log-probabilities.*probabilities passed"):
        rc.is_weights(lt, lr.exp(), m)  # probabilities by mistake
    pos = lt.clone()
    pos[0, 0] = 1e-6  # fp32 rounding just above 0 is tolerated
    rc.is_weights(pos, lr, m)
    with pytest.raises(ValueError, match="floating-point"):
        rc.mismatch_metrics(lt.long(), lr, m)
    meta = torch.zeros(3, 5, device="meta")
    with pytest.raises(ValueError, match=r"logp_rollout is on meta.*logp_train is on cpu"):
        rc.is_weights(lt, meta, m)
    with pytest.raises(ValueError, match=r"mask is on meta"):
        rc.mismatch_metrics(lt, lr, meta)


def test_empty_batch_metrics_are_nan():
    e = torch.zeros(0, 4)
    got = rc.mismatch_metrics(e, e, e)
    assert all(math.isnan(v) for v in got.values())
