"""Notebook 05's decisions: the per-run metric, the Holm family, TOST equivalence, the verdict rules, the gates."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from helpers.grpo.analysis import (ANCHORS, COMPARISONS, Comparison, comparisons_for, decide, mismatch_table,
                                   per_run_table, verdicts)


def _long_table(effects: dict[str, float], n_seeds: int = 16, sd: float = 0.004, kl: dict | None = None,
                seed: int = 0) -> pd.DataFrame:
    """A run_arms-like table: per arm and seed, an evaluation curve rising from 0.3 by 0.1 plus the arm's effect
    (and a seed effect shared by every arm, and per-run noise of ``sd``), 5 evaluations over 40 steps."""
    rng = np.random.default_rng(seed)
    seed_fx = rng.normal(0, 0.03, n_seeds)
    rows = []
    for arm, fx in effects.items():
        engine, corr = arm.split(" / ")
        for s in range(n_seeds):
            noise = rng.normal(0, sd)
            for step in range(40):
                r = {"arm": arm, "engine": engine, "correction": corr, "seed": s, "step": step,
                     "mismatch/kl": (kl or {}).get(engine, 1e-3), "mismatch/k3_kl": 1e-3,
                     "mismatch/token_mult_prob_error": 1.0 + 10 * (kl or {}).get(engine, 1e-3),
                     "mismatch/fraction_truncated": 0.001, "actor/clipfrac": 0.002,
                     "correction/rejected_fraction_token": 0.0, "reward/mean": 0.4, "eval/acc": np.nan}
                if step % 10 == 0:
                    r["eval/acc"] = 0.3 + (0.1 * step / 40 + fx + seed_fx[s] + noise if step else 0.0)
                rows.append(r)
            rows[-1]["eval/acc"] = 0.4 + fx + seed_fx[s] + noise  # the final evaluation, after the last step
    return pd.DataFrame(rows)


def test_per_run_table_auc_and_final3():
    df = _long_table({"bf16 / none": 0.0}, n_seeds=2)
    runs = per_run_table(df)
    assert list(runs.columns[:4]) == ["arm", "engine", "correction", "seed"]
    g = df[(df.seed == 0)].dropna(subset=["eval/acc"]).sort_values("step")["eval/acc"].to_numpy()
    r = runs[runs.seed == 0].iloc[0]
    assert r.acc0 == g[0] and r.auc == pytest.approx(g[1:].mean()) and r.final3 == pytest.approx(g[-3:].mean())
    with pytest.raises(ValueError, match="lacks columns"):
        per_run_table(df.drop(columns=["eval/acc"]))


def test_decide_matches_scipy_and_statsmodels():
    effects = {"bf16 / none": 0.0, "bf16 / token TIS": 0.0, "fp8 / none": -0.012, "fp8 / token TIS": 0.0,
               "fp8+kv / none": -0.05, "fp8+kv / token TIS": -0.002}
    runs = per_run_table(_long_table(effects))
    table = decide(runs, COMPARISONS)
    assert len(table) == len(COMPARISONS)
    piv = runs.pivot_table(index="seed", columns="arm", values="auc")
    p_raw = []
    for c, (_, r) in zip(COMPARISONS, table.iterrows()):
        d = piv[c.arm] - piv[c.reference]
        assert r["diff"] == pytest.approx(d.mean())
        if c.kind == "difference":
            p = stats.ttest_rel(piv[c.arm], piv[c.reference]).pvalue
        else:
            p = max(stats.ttest_1samp(d, -0.01, alternative="greater").pvalue,
                    stats.ttest_1samp(d, 0.01, alternative="less").pvalue)
        assert r.p == pytest.approx(p, rel=1e-9)
        p_raw.append(p)
    np.testing.assert_allclose(table.p_holm, multipletests(p_raw, method="holm")[1], rtol=1e-9)
    assert (table.mde > 0).all() and (table.n == 16).all()


def test_verdicts_on_the_effect_the_reanalysis_found():
    # W8A8: drop 0.013 without correction, TIS recovers it; FP8 KV: same; BF16 + TIS control equivalent.
    effects = {"bf16 / none": 0.0, "bf16 / token TIS": 0.0, "fp8 / none": -0.013, "fp8 / token TIS": 0.0,
               "fp8+kv / none": -0.03, "fp8+kv / token TIS": 0.0}
    runs = per_run_table(_long_table(effects, sd=0.003))
    table = decide(runs, COMPARISONS)
    v = dict((c, (verdict, why)) for c, verdict, why in verdicts(table, ["fp8", "fp8+kv"]))
    assert v["FP8 rollouts corrected by importance sampling learn like BF16 rollouts"][0] == "reproduced"
    assert v["Without the correction accuracy drops"][0] == "reproduced"
    assert "FP8-specific" in v["Without the correction accuracy drops"][1]


def test_verdicts_no_drop_and_a_corrected_arm_below_bf16():
    effects = {"bf16 / none": 0.0, "bf16 / token TIS": 0.0, "fp8 / none": 0.0, "fp8 / token TIS": -0.03}
    runs = per_run_table(_long_table(effects, sd=0.003))
    table = decide(runs, comparisons_for(["fp8"]))
    v = {c: verdict for c, verdict, _ in verdicts(table, ["fp8"])}
    assert v["FP8 rollouts corrected by importance sampling learn like BF16 rollouts"] == "not reproduced"
    assert v["Without the correction accuracy drops"] == "not reproduced"  # interval rules out a drop > margin


def test_verdicts_inconclusive_with_too_few_noisy_seeds():
    effects = {"bf16 / none": 0.0, "fp8 / none": -0.01, "fp8 / token TIS": -0.005}
    runs = per_run_table(_long_table(effects, n_seeds=3, sd=0.03))
    table = decide(runs, comparisons_for(["fp8"]))
    v = {c: verdict for c, verdict, _ in verdicts(table, ["fp8"])}
    assert set(v.values()) == {"inconclusive"}


def test_comparison_kind_checked():
    with pytest.raises(ValueError, match="kind"):
        Comparison("a", "b", "bigger", "?")


def test_mismatch_table_gates():
    effects = {"bf16 / none": 0.0, "fp8 / none": 0.0, "fp8+kv / none": 0.0}
    df = _long_table(effects, n_seeds=2, kl={"bf16": 1e-4, "fp8": 0.002, "fp8+kv": 0.2})
    mt = mismatch_table(per_run_table(df)).set_index("engine")
    assert mt.loc["fp8", "gate_pass"] and mt.loc["bf16", "gate_pass"]  # 1.02, 1.001 < 1.1
    assert not mt.loc["fp8+kv", "gate_pass"]  # 3.0 > 2.0
    assert mt.loc["fp8", "k1_vs_llm"] == pytest.approx(0.002 / ANCHORS["gen_kl_measured_high"])


def test_extra_corrections_join_the_family():
    fam = comparisons_for(["fp8"], extra_corrections=("token IcePop",))
    assert len(fam) == 6
    assert (fam[-2].arm, fam[-2].reference, fam[-2].kind) == ("fp8 / token IcePop", "fp8 / none", "difference")
    assert (fam[-1].reference, fam[-1].kind) == ("bf16 / none", "equivalence")


def test_decide_without_runs_of_the_family_has_the_columns():
    runs = per_run_table(_long_table({"bf16 / none": 0.0}, n_seeds=2))
    empty = decide(runs, comparisons_for(["fp8+kv"]))
    assert empty.empty and {"diff", "low", "high", "p_holm", "decided", "mde"} <= set(empty.columns)
