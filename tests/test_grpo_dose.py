"""Notebook 07's decisions: the dose-response table, where each correction stops recovering, the gate table and
the KL-ordering verdicts, on synthetic run tables whose answers are known."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from helpers.grpo.dose import (DOSE_ARMS, GATES, dose_arms, dose_response, gate_table, kl_ordering,
                               ordering_verdicts, recovery_limits, rollout_only)
from helpers.grpo.experiment import ENGINES

# engine -> (per-token k1, loss of the primary metric without correction); token TIS recovers up to k1 0.05
ENG = {"fp32": (1e-9, 0.0), "bf16": (2e-3, 0.0), "fp8 e2e": (6e-3, 0.0), "fp8": (1.1e-2, 0.012),
       "noise 1": (4.6e-2, 0.03), "noise 2": (0.19, 0.08)}


def _runs(n_seeds: int = 16, sd: float = 0.003, seed: int = 0) -> pd.DataFrame:
    """A gate_runs-like per-run table: auc = 0.5 + seed effect - loss (+ noise); TIS recovers the loss fully up to
    k1 0.05 and half of it beyond; gate statistics grow with k1."""
    rng = np.random.default_rng(seed)
    seed_fx = rng.normal(0, 0.02, n_seeds)
    rows = []
    for engine, (k1, loss) in ENG.items():
        for corr in ("none", "token_tis") if engine != "fp32" else ("none",):
            lost = loss if corr == "none" else (0.0 if k1 < 0.05 else loss / 2)
            for s in range(n_seeds):
                kk = k1 * np.exp(rng.normal(0, 0.1))
                rows.append({"arm": f"{engine} / {'none' if corr == 'none' else 'token TIS'}", "engine": engine,
                             "correction": corr, "seed": s, "auc": 0.5 + seed_fx[s] - lost + rng.normal(0, sd),
                             "kl_k1": kk, "kl_k3": kk, "tmpe_median": 1 + 5 * kk, "tmpe_mean": 1 + 6 * kk,
                             "tmpe_max": 1 + 30 * kk, "chi2_token": 2 * kk, "ess_deficit": kk,
                             "frac_ratio_above_2": kk / 5})
    return pd.DataFrame(rows)


def test_grid_arms_are_registered():
    arms = dose_arms()
    assert {a.engine for a in arms} <= set(ENGINES)
    assert len(arms) == sum(len(c) for c in DOSE_ARMS.values())


def test_dose_response_verdicts_and_recovery():
    runs = _runs()
    dose = dose_response(runs).set_index("arm")
    for engine, (_, loss) in ENG.items():
        if engine == "fp32":
            assert f"{engine} / none" not in dose.index  # the reference itself
            continue
        v = dose.loc[f"{engine} / none", "verdict"]
        assert v == ("loss" if loss > 0 else "within margin"), (engine, v)
        assert dose.loc[f"{engine} / none", "loss"] == pytest.approx(loss, abs=0.003)
    assert dose.loc["fp8 / token TIS", "verdict"] == "within margin"
    assert dose.loc["noise 2 / token TIS", "verdict"] == "loss"
    assert dose.loc["noise 2 / token TIS", "recovered"] == pytest.approx(0.5, abs=0.1)
    assert np.isnan(dose.loc["bf16 / token TIS", "recovered"])  # nothing to recover: bf16 has no decided loss
    # the Holm family is every test of the table: adjusted p-values are >= raw ones
    assert (dose.p_diff_holm >= dose.p_diff - 1e-15).all() and (dose.p_equiv_holm >= dose.p_equiv - 1e-15).all()
    one = runs[runs.arm.isin(["fp32 / none", "fp8 / none"])]
    d = (one[one.arm == "fp32 / none"].set_index("seed").auc - one[one.arm == "fp8 / none"].set_index("seed").auc)
    assert dose.loc["fp8 / none", "p_diff"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    lim = recovery_limits(dose_response(runs)).set_index("correction")
    assert lim.loc["none", "first_loss_engine"] == "fp8" and lim.loc["none", "last_no_loss_engine"] == "fp8 e2e"
    assert lim.loc["token_tis", "first_loss_engine"] == "noise 2"
    assert lim.loc["token_tis", "last_no_loss_engine"] == "noise 1"


def test_gate_table_rank_correlation_and_thresholds():
    runs = _runs()
    dose = dose_response(runs)
    table = gate_table(runs, dose, n_boot=200).set_index("gate")
    assert set(table.index) == {g.column for g in GATES}
    sub = runs[(runs.correction == "none") & (runs.arm != "fp32 / none")].copy()
    ref = runs[runs.arm == "fp32 / none"].set_index("seed").auc
    sub["loss"] = sub.seed.map(ref) - sub.auc
    assert table.loc["kl_k1", "spearman"] == pytest.approx(stats.spearmanr(sub.kl_k1, sub.loss).statistic)
    assert table.loc["kl_k1", "low"] <= table.loc["kl_k1", "spearman"] <= table.loc["kl_k1", "high"]
    # the loss becomes detectable between fp8 e2e (6e-3, no loss) and fp8 (1.1e-2, loss)
    assert 5e-3 < table.loc["kl_k1", "threshold_low"] < table.loc["kl_k1", "threshold_high"] < 1.3e-2
    assert table.loc["tmpe_median", "anchor"] == 1.1
    only = gate_table(runs, dose, engines=rollout_only(ENG), n_boot=50).set_index("gate")
    assert only.runs.iloc[0] == len(sub[sub.engine != "fp8 e2e"])  # the FP8 trainer's arm is left out
    with pytest.raises(ValueError, match="no run"):
        gate_table(runs, dose, engines=["nonexistent"], n_boot=10)


def test_kl_ordering_and_verdicts():
    runs = _runs()
    order = kl_ordering(runs)
    assert list(order.holds) == [True, True]
    assert order.ratio.iloc[0] == pytest.approx(1.1e-2 / 6e-3, rel=0.15)
    v = dict((c, (vv, why)) for c, vv, why in ordering_verdicts(order, dose_response(runs)))
    (v1, _), (v2, why2) = v.values()
    assert v1 == "reproduced" and v2 == "reproduced" and "within margin" in why2
    swapped = runs.copy()
    swapped.loc[swapped.engine == "fp8 e2e", "kl_k1"] *= 3  # e2e now above W8A8
    order2 = kl_ordering(swapped)
    assert ordering_verdicts(order2, dose_response(swapped))[0][1] == "not reproduced"
    lossy = runs.copy()
    lossy.loc[lossy.arm == "fp8 e2e / none", "auc"] -= 0.02
    assert ordering_verdicts(kl_ordering(lossy), dose_response(lossy))[1][1] == "not reproduced"


def test_master_weights_arm_and_its_verdict():
    """An end-to-end arm that logged eval/acc_master gets a twin arm scored on it; the third ordering verdict
    decides the FP8 training alone."""
    from helpers.grpo.dose import MASTER, with_master_eval
    df = pd.DataFrame({"arm": ["fp8 e2e / none"] * 2 + ["bf16 / none"] * 2, "engine": ["fp8 e2e"] * 2 + ["bf16"] * 2,
                       "correction": ["none"] * 4, "seed": [0, 0, 0, 0], "step": [0, 1, 0, 1],
                       "eval/acc": [0.3, 0.31, 0.3, 0.35], "eval/acc_master": [0.3, 0.34, np.nan, np.nan]})
    out = with_master_eval(df)
    twin = out[out.correction == MASTER]
    assert list(twin.arm.unique()) == ["fp8 e2e / master weights"] and list(twin["eval/acc"]) == [0.3, 0.34]
    assert len(with_master_eval(df.drop(columns="eval/acc_master"))) == 4
    runs = _runs()
    master = runs[runs.arm == "fp8 e2e / none"].copy()
    master["arm"], master["correction"] = "fp8 e2e / master weights", MASTER
    both = pd.concat([runs, master], ignore_index=True)
    v = ordering_verdicts(kl_ordering(both), dose_response(both))
    assert len(v) == 3 and v[2][1] == "reproduced"
