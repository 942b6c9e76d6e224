"""helpers.rl.rejection (veRL's k1/k2/k3 rejection, slime's veto, NeMo-RL's error mask) against direct loops on
hand-built log-probs with NaN-filled padding, including the presets' thresholds."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.rl import rejection as rj


def _inputs(B, T, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lt = -torch.rand(B, T, generator=g) * 3 - 0.5
    lr = (lt + scale * torch.randn(B, T, generator=g)).clamp(max=0.0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    lt = torch.where(mask > 0, lt, torch.full_like(lt, float("nan")))
    lr = torch.where(mask > 0, lr, torch.full_like(lr, float("nan")))
    return lt, lr, mask


def _direct_keep(lt, lr, mask, opt, lo, hi):
    """Keep mask of one veRL option by Python loops (float64)."""
    B, T = lt.shape
    agg, k = opt.rsplit("_", 1)
    out = torch.zeros(B, T)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        lrs = [max(min(float(lt[b, t]) - float(lr[b, t]), 20.0), -20.0) for t in idx]
        f = {"k1": lambda x: -x, "k2": lambda x: 0.5 * x * x, "k3": lambda x: math.exp(x) - 1 - x}[k]
        vals = [f(x) for x in lrs]

        def ok(v):
            return math.log(lo) <= v <= math.log(hi) if k == "k1" else v <= hi

        if agg == "token":
            for t, v in zip(idx, vals):
                out[b, t] = float(ok(v))
        else:
            s = {"seq_sum": sum(vals), "seq_mean": sum(vals) / len(vals), "seq_max": max(vals)}[agg]
            for t in idx:
                out[b, t] = float(ok(s))
    return out


CASES = [("token_k1", "0.5_2.0", 0.5, 2.0), ("token_k1", 1.5, 1 / 1.5, 1.5), ("token_k2", 0.02, None, 0.02),
         ("token_k3", 0.02, None, 0.02), ("seq_sum_k1", "0.5_2.0", 0.5, 2.0), ("seq_sum_k2", 0.1, None, 0.1),
         ("seq_sum_k3", 0.1, None, 0.1), ("seq_mean_k1", "0.97_1.03", 0.97, 1.03), ("seq_mean_k2", 0.02, None, 0.02),
         ("seq_mean_k3", 0.01, None, 0.01), ("seq_max_k2", 0.05, None, 0.05), ("seq_max_k3", 0.05, None, 0.05)]


@pytest.mark.parametrize("opt,spec,lo,hi", CASES)
@pytest.mark.parametrize("B,T", [(1, 1), (6, 9), (4, 40)])
def test_rollout_rs_matches_direct(opt, spec, lo, hi, B, T):
    lt, lr, mask = _inputs(B, T, seed=B * 7 + T)
    kept, met = rj.rollout_rs_mask(lt, lr, mask, opt, spec)
    ref = _direct_keep(lt, lr, mask, opt, lo, hi) * mask
    assert torch.equal(kept, ref)
    rej = float(((mask - ref) > 0).sum() / mask.sum())
    assert met["rollout_rs_masked_fraction"] == pytest.approx(rej, abs=1e-6)
    assert met[f"rollout_rs_{opt}_masked_fraction"] == pytest.approx(rej, abs=1e-6)


def test_chained_options_and_per_option_thresholds():
    lt, lr, mask = _inputs(5, 12, seed=3)
    kept, met = rj.rollout_rs_mask(lt, lr, mask, "token_k1, seq_mean_k3", "0.5_2.0,0.02")
    a = _direct_keep(lt, lr, mask, "token_k1", 0.5, 2.0)
    b = _direct_keep(lt, lr, mask, "seq_mean_k3", None, 0.02)
    assert torch.equal(kept, a * b * mask)
    assert {"rollout_rs_token_k1_mean", "rollout_rs_seq_mean_k3_seq_masked_fraction"} <= set(met)


def test_presets_thresholds_hand_made():
    # one token per row with ratio r = pi_train / pi_rollout: veRL's k1 = -log r
    r = torch.tensor([[1.0005], [1.002], [0.9995], [0.998]])
    lr = torch.full((4, 1), -1.0)
    lt = lr + torch.log(r)
    m = torch.ones(4, 1)
    geo, _ = rj.rollout_rs_mask(lt, lr, m, "seq_mean_k1", "0.999_1.001")  # Geo-RS preset: +-0.1 %
    assert geo[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    # K3-RS preset: seq mean of k3 <= 0.01. k3(r) = r - 1 - log r: r = 1.15 -> 0.0102 (out), 1.14 -> 0.0090 (in)
    r3 = torch.tensor([[1.15, 1.15], [1.14, 1.14], [1.15, 1.0]])
    lr3 = torch.full((3, 2), -2.0)
    k3, _ = rj.rollout_rs_mask(lr3 + torch.log(r3), lr3, torch.ones(3, 2), "seq_mean_k3", 0.01)
    assert k3[:, 0].tolist() == [0.0, 1.0, 1.0]
    # Seq-MIS preset: seq_sum_k1 in [log 0.5, log 2]: sequence ratio prod r = 1.5 * 1.5 = 2.25 -> 1/2.25 < 0.5 out
    r2 = torch.tensor([[1.5, 1.5], [1.5, 1.2]])
    lr2 = torch.full((2, 2), -1.0)
    sm, _ = rj.rollout_rs_mask(lr2 + torch.log(r2), lr2, torch.ones(2, 2), "seq_sum_k1", "0.5_2.0")
    assert sm[:, 0].tolist() == [0.0, 1.0]


def test_slime_veto_and_nemo_error_mask():
    lr = torch.full((3, 3), -1.0)
    lt = lr.clone()
    lt[1, 2] = -1.0 + math.log(5e-5)  # r = 5e-5 < 1e-4: vetoes row 1
    lt[2, 0] = -1.0 + math.log(2e-4)  # above the veto threshold
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    lt[0, 2] = float("nan")
    kept, met = rj.slime_veto_mask(lt, lr, m, 1e-4)
    assert torch.equal(kept, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert met["veto_seq_fraction"] == pytest.approx(1 / 3)
    # NeMo-RL: mean_t exp|d| per sequence; row 0: exp(0)=1; row 1: (1 + 1 + exp(0.6)) / 3 = 1.27; row 2: exp(0.5)=1.65
    lt2 = lr.clone()
    lt2[1, 2] = -1.6
    lt2[2] = -1.5
    kept2, met2 = rj.seq_logprob_error_mask(lt2, lr, torch.ones(3, 3), threshold=1.5)
    assert kept2[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert met2["num_masked_seqs_by_logprob_error"] == 1.0
    assert met2["seq_logprob_error_max"] == pytest.approx(math.exp(0.5), rel=1e-6)


@pytest.mark.parametrize("rs,spec,match", [
    ("token", 2.0, "token_k1"), ("seq_sum_k1", None, "rollout_rs_threshold"), ("seq_max_k1", 2.0, "not one of"),
    ("token_k3", "0.1_0.2", "one upper bound"), ("token_k1", "2.0_0.5", "lower <= upper"),
    ("token_k1,token_k3", "1,2,3", "one per option"), ("token_k2", -1.0, "positive"), ("", 1.0, "non-empty"),
])
def test_bad_rs_arguments(rs, spec, match):
    lt, lr, m = _inputs(2, 3, seed=0)
    with pytest.raises(ValueError, match=match):
        rj.rollout_rs_mask(lt, lr, m, rs, spec)


def test_all_masked_gives_nan_metrics():
    x = torch.full((2, 3), float("nan"))
    m = torch.zeros(2, 3)
    kept, met = rj.rollout_rs_mask(x, x, m, "seq_mean_k3", 0.01)
    assert torch.equal(kept, m) and all(math.isnan(v) for v in met.values())
    assert math.isnan(rj.slime_veto_mask(x, x, m)[1]["veto_seq_fraction"])
