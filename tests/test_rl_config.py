"""helpers.rl.config: veRL's RolloutCorrection config, its presets, apply_rollout_correction and bypass_policy_loss,
against direct computations on hand-built log-probs with NaN-filled padding."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers import rl
from helpers.rl import config as cf
from helpers.rl import rejection as rj
from helpers.rl import rollout_correction as rc
from helpers.rl.losses import agg_loss, clipped_surrogate


def _inputs(B, T, seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    lt = -torch.rand(B, T, generator=g) * 3 - 0.5
    lr = (lt + scale * torch.randn(B, T, generator=g)).clamp(max=0.0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    nan = torch.full_like(lt, float("nan"))
    return torch.where(mask > 0, lt, nan), torch.where(mask > 0, lr, nan), mask


def test_presets_match_verl():
    p = cf.PRESETS
    assert p["decoupled_token_icepop"].rollout_is == "token" and p["decoupled_token_icepop"].rollout_is_threshold == "0.5_5.0"
    s = p["decoupled_seq_is_rs"]  # Seq-MIS
    assert (s.rollout_is, s.rollout_is_threshold, s.rollout_rs, s.rollout_rs_threshold) == \
        ("sequence", 2.0, "seq_sum_k1", "0.5_2.0")
    g = p["decoupled_geo_rs"]
    assert (g.rollout_is, g.rollout_rs, g.rollout_rs_threshold) == (None, "seq_mean_k1", "0.999_1.001")
    k = p["decoupled_k3_rs"]
    assert (k.rollout_is, k.rollout_rs, k.rollout_rs_threshold) == (None, "seq_mean_k3", 0.01)
    assert p["bypass_ppo_clip"].bypass_mode and p["bypass_ppo_clip"].loss_type == "ppo_clip"
    b = p["bypass_pg_is"]
    assert (b.bypass_mode, b.loss_type, b.rollout_is, b.rollout_is_threshold) == (True, "reinforce", "sequence", 2.0)
    assert all(isinstance(v, cf.RolloutCorrection) for v in p.values())
    assert cf.preset("decoupled_k3_rs", rollout_rs_threshold=0.005).rollout_rs_threshold == 0.005
    assert rl.apply_rollout_correction is cf.apply_rollout_correction and rl.is_weights is rc.is_weights


@pytest.mark.parametrize("kw,match", [
    ({"rollout_is": "batch"}, "rollout_is"), ({"rollout_is_threshold": "5.0_0.5"}, "lower <= upper"),
    ({"rollout_is_threshold": 0.0}, "rollout_is_threshold"), ({"rollout_is_threshold": "a_b"}, "rollout_is_threshold"),
    ({"rollout_rs": "seq_mean_k3"}, "rollout_rs_threshold"), ({"rollout_rs_threshold": 0.01}, "needs rollout_rs"),
    ({"loss_type": "reinforce"}, "bypass mode only"), ({"loss_type": "pg"}, "loss_type"),
    ({"bypass_mode": True, "rollout_is": "token"}, "PPO ratio"), ({"rollout_is_batch_normalize": 1}, "bool"),
    ({"slime_veto_threshold": 0.0}, "slime_veto_threshold"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        cf.RolloutCorrection(**kw)


def test_unknown_preset_and_cfg_type():
    lt, lr, m = _inputs(2, 3, seed=0)
    with pytest.raises(ValueError, match="preset name"):
        cf.apply_rollout_correction(lt, lr, m, "token_is")
    with pytest.raises(ValueError, match="cfg must be"):
        cf.apply_rollout_correction(lt, lr, m, {"rollout_is": "token"})


def _direct_level_ratio(lt, lr, m, level):
    B, T = lt.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if m[b, t] > 0]
        d = [max(min(float(lt[b, t] - lr[b, t]), 20.0), -20.0) for t in idx]
        for j, t in enumerate(idx):
            x = d[j] if level == "token" else max(min(sum(d), 20.0), -20.0)
            out[b, t] = math.exp(x)
    return out


@pytest.mark.parametrize("B,T", [(1, 1), (4, 9), (3, 50)])
def test_icepop_zeroes_weights_and_keeps_the_mask(B, T):
    lt, lr, m = _inputs(B, T, seed=B + T, scale=0.8)
    w, loss_mask, met = cf.apply_rollout_correction(lt, lr, m, "decoupled_token_icepop")
    raw = _direct_level_ratio(lt, lr, m, "token")
    ref = torch.where((raw >= 0.5) & (raw <= 5.0), raw, torch.zeros_like(raw)) * m
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-7)  # fp32 exp vs float64 math.exp
    assert torch.equal(loss_mask, m)  # IcePop never touches the denominator
    oob = float((((raw < 0.5) | (raw > 5.0)).double() * m).sum() / m.sum())
    assert met["rollout_corr/rollout_is_oob_ratio"] == pytest.approx(oob, abs=1e-6)
    assert met["rollout_corr/rejected_fraction_token"] == 0.0


def test_seq_mis_preset_weights_and_rejection():
    lt, lr, m = _inputs(6, 7, seed=11, scale=0.3)
    w, loss_mask, met = cf.apply_rollout_correction(lt, lr, m, "decoupled_seq_is_rs")
    raw = _direct_level_ratio(lt, lr, m, "sequence")
    torch.testing.assert_close(w.double(), raw.clamp(max=2.0) * m, rtol=1e-5, atol=1e-7)
    # veRL's seq_sum_k1 keeps sequences with 1/ratio in [0.5, 2]
    keep = ((raw[:, :1] >= 0.5 - 1e-9) & (raw[:, :1] <= 2.0 + 1e-9)).float()
    assert torch.equal(loss_mask, keep * m)
    assert met["rollout_corr/rollout_rs_seq_sum_k1_masked_fraction"] == pytest.approx(
        float(((m - loss_mask) > 0).sum() / m.sum()), abs=1e-6)
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "token_mult_prob_error", "gen_kl_error", "fraction_truncated"):
        assert f"rollout_corr/{k}" in met


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batch_normalised_weights_average_one(level):
    lt, lr, m = _inputs(5, 8, seed=2, scale=0.5)
    cfg = cf.RolloutCorrection(rollout_is=level, rollout_is_threshold=2.0, rollout_is_batch_normalize=True)
    w, _, met = cf.apply_rollout_correction(lt, lr, m, cfg)
    raw = _direct_level_ratio(lt, lr, m, level).clamp(max=2.0) * m  # truncated first, then normalised
    if level == "token":
        mean = float(raw.sum() / m.sum())
        assert float((w * m).sum() / m.sum()) == pytest.approx(1.0, rel=1e-5)
    else:
        per_seq = raw.sum(-1) / m.sum(-1)
        mean = float(per_seq.mean())
        assert float(((w * m).sum(-1) / m.sum(-1)).mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(w.double(), raw / mean, rtol=1e-5, atol=1e-7)
    assert met["rollout_corr/rollout_is_batch_norm_factor"] == pytest.approx(mean, rel=1e-5)


def test_k3_rs_with_vetoes_and_metrics_only():
    lt, lr, m = _inputs(6, 10, seed=5, scale=0.2)
    cfg = cf.preset("decoupled_k3_rs_token_tis", slime_veto_threshold=0.5, seq_logprob_error_threshold=1.2)
    w, loss_mask, met = cf.apply_rollout_correction(lt, lr, m, cfg)
    k3, _ = rj.rollout_rs_mask(lt, lr, m, "seq_mean_k3", 0.01)
    veto, _ = rj.slime_veto_mask(lt, lr, m, 0.5)
    err, _ = rj.seq_logprob_error_mask(lt, lr, m, 1.2)
    assert torch.equal(loss_mask, k3 * veto * err)
    torch.testing.assert_close(w, rc.is_weights(lt, lr, m, level="token", threshold=2.0))
    w0, mask0, met0 = cf.apply_rollout_correction(lt, lr, m, "disabled")
    assert w0 is None and torch.equal(mask0, m) and "rollout_corr/kl" in met0
    assert met0["rollout_corr/kl"] == pytest.approx(rc.mismatch_metrics(lt, lr, m)["kl"])


def test_apply_on_an_all_masked_batch_gives_nan():
    x = torch.full((2, 3), float("nan"))
    m = torch.zeros(2, 3, dtype=torch.bool)
    w, loss_mask, met = cf.apply_rollout_correction(x, x, m, "decoupled_seq_is_rs")
    assert torch.equal(w, torch.zeros(2, 3)) and torch.equal(loss_mask, torch.zeros(2, 3))
    assert all(math.isnan(v) for v in met.values())


def test_bypass_ppo_clip_is_the_clipped_surrogate_against_the_rollout():
    lt, lr, m = _inputs(4, 6, seed=8, scale=0.3)
    adv = torch.randn(4)
    lp = lt.clone().requires_grad_(True)
    loss, loss_mask, met = cf.bypass_policy_loss(lp, lr, adv, m, "bypass_ppo_clip_k3_rs", clip_low=0.2, clip_high=0.28)
    kept, _ = rj.rollout_rs_mask(lt, lr, m, "seq_mean_k3", 0.01)
    ref, _ = clipped_surrogate(lt, lr, adv, kept, clip_low=0.2, clip_high=0.28)
    assert torch.equal(loss_mask, kept)
    torch.testing.assert_close(loss, ref)
    agg_loss(loss, loss_mask).backward()
    assert bool(torch.isfinite(lp.grad).all()) and "rollout_corr/clipfrac" in met


@pytest.mark.parametrize("name", ["bypass_pg_is", "bypass_pg_token_icepop", "bypass_pg_geo_rs"])
def test_bypass_reinforce_gradient_is_minus_a_w(name):
    lt, lr, m = _inputs(5, 7, seed=9, scale=0.3)
    adv = torch.randn(5, 7)
    cfg = cf.preset(name, rollout_rs_threshold="0.9_1.1") if "geo" in name else cf.preset(name)
    lp = lt.clone().requires_grad_(True)
    loss, loss_mask, _ = cf.bypass_policy_loss(lp, lr, adv, m, cfg)
    loss.sum().backward()
    if cfg.rollout_is is None:
        w = m
    else:
        w, _ = rc.rollout_is_weights(lt, lr, m, cfg.rollout_is, cfg.rollout_is_threshold)
    expected = torch.where(loss_mask > 0, -adv * w, torch.zeros_like(w))  # d(-A w logp)/dlogp with w detached
    torch.testing.assert_close(lp.grad, expected)
    assert bool((loss[loss_mask == 0] == 0).all())


def test_bypass_needs_a_bypass_config():
    lt, lr, m = _inputs(2, 3, seed=0)
    with pytest.raises(ValueError, match="bypass_mode=True"):
        cf.bypass_policy_loss(lt, lr, torch.ones(2), m, "decoupled_token_is")
    with pytest.raises(ValueError, match="advantages"):
        cf.bypass_policy_loss(lt, lr, torch.ones(3), m, "bypass_ppo_clip")
