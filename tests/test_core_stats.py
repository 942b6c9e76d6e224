"""helpers.stats against hand computations."""

import math

import numpy as np
import pandas as pd
import pytest

from helpers.core import stats


def test_iqm_by_hand():
    # 8 values: drop the 2 lowest and 2 highest, average the middle 4
    assert stats.iqm([10, 1, 7, 3, 100, 5, -50, 4]) == pytest.approx((3 + 4 + 5 + 7) / 4)
    assert stats.iqm([2.0, 4.0]) == 3.0  # n < 4: nothing trimmed
    np.testing.assert_allclose(stats.iqm(np.array([[1, 2, 3, 4], [0, 0, 0, 8]]), axis=1), [2.5, 0.0])
    with pytest.raises(ValueError, match="x must"):
        stats.iqm([])


def test_bootstrap_ci_is_degenerate_for_constant_data_and_covers_the_estimate():
    est, lo, hi = stats.stratified_bootstrap_ci({"a": [3.0] * 5, "b": [3.0] * 7}, n_resamples=200)
    assert est == lo == hi == 3.0
    rng = np.random.default_rng(0)
    groups = {"a": rng.normal(0, 1, 5), "b": rng.normal(1, 1, 9)}
    est, lo, hi = stats.stratified_bootstrap_ci(groups, n_resamples=500, seed=1)
    assert lo <= est <= hi
    assert est == pytest.approx(stats.iqm(np.concatenate(list(groups.values()))))
    assert (est, lo, hi) == stats.stratified_bootstrap_ci(groups, n_resamples=500, seed=1)  # seeded


def test_bootstrap_is_stratified():
    # strata {0,0} and {10,10,10}: every stratified resample keeps 2 zeros and 3 tens, so the mean is always 6
    est, lo, hi = stats.stratified_bootstrap_ci([[0.0, 0.0], [10.0, 10.0, 10.0]], np.mean, n_resamples=300)
    assert est == lo == hi == 6.0


def test_bootstrap_matches_scipy_percentile_for_one_stratum():
    from scipy.stats import bootstrap

    x = np.random.default_rng(3).normal(size=12)
    _, lo, hi = stats.stratified_bootstrap_ci([x], np.mean, n_resamples=20_000, seed=0)
    ref = bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", random_state=0).confidence_interval
    # two Monte Carlo estimates of the same quantiles: agree to a few percent of the interval width
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.05 * width and abs(hi - ref.high) < 0.05 * width


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="groups"):
        stats.stratified_bootstrap_ci([[]])
    with pytest.raises(ValueError, match="confidence"):
        stats.stratified_bootstrap_ci([[1.0]], confidence=1.5)


def test_moving_average_and_steps_to_threshold():
    np.testing.assert_allclose(stats.moving_average([1, 2, 3, 4], 2), [np.nan, 1.5, 2.5, 3.5])
    steps = np.array([10, 25, 40, 60, 90])
    returns = np.array([0, 10, 20, 30, 40])
    # window 2 averages: -, 5, 15, 25, 35 -> first >= 15 at episode 2 (step 40)
    assert stats.steps_to_threshold(steps, returns, 15, window=2) == 40
    assert stats.steps_to_threshold(steps, returns, 30, window=1) == 60
    assert math.isnan(stats.steps_to_threshold(steps, returns, 36, window=2))
    assert math.isnan(stats.steps_to_threshold(steps[:1], returns[:1], 0, window=20))  # no full window yet
    with pytest.raises(ValueError, match="steps and returns"):
        stats.steps_to_threshold(steps, returns[:3], 1)


def test_normalized_auc_by_hand():
    # linear 0 -> 1 over [0, 10]: mean 0.5; a constant at 'high' gives 1
    assert stats.normalized_auc([0, 10], [0, 1], 0, 1) == pytest.approx(0.5)
    assert stats.normalized_auc([0, 5, 10], [3, 3, 3], -1, 3) == pytest.approx(1.0)
    # trapezoids on an uneven grid: (0+2)/2*2 + (2+2)/2*6 = 2 + 12 = 14 over 8 steps, normalised by high - low = 4
    assert stats.normalized_auc([0, 2, 8], [0, 2, 2], 0, 4) == pytest.approx(14 / 8 / 4)
    with pytest.raises(ValueError, match="high"):
        stats.normalized_auc([0, 1], [0, 1], 1, 1)


def test_normalize_return_and_curve_on_grid():
    assert stats.normalize_return("CartPole-v1", stats.REWARD_THRESHOLDS["CartPole-v1"]) == pytest.approx(1.0)
    assert stats.normalize_return("MountainCar-v0", -200.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="env_id"):
        stats.normalize_return("Pong-v5", 0.0)
    out = stats.curve_on_grid([10, 20, 30], [1.0, 3.0, 5.0], np.array([5, 20, 29, 40]), window=2)
    np.testing.assert_allclose(out, [np.nan, 2.0, 2.0, 4.0])


def test_per_run_and_summary_tables():
    ep = pd.DataFrame({"env_id": "CartPole-v1", "method": "A", "seed": 0, "step": np.arange(1, 41) * 100,
                       "charts/episodic_return": np.r_[np.zeros(20), np.full(20, 500.0)]})
    ev = pd.DataFrame({"env_id": "CartPole-v1", "method": "A", "seed": 0, "step": [2000, 4000],
                       "eval/return_mean": [100.0, 500.0]})
    runs = stats.per_run_table(ep, ev)
    r = runs.iloc[0]
    # the window-20 mean reaches 475 once 19 of the 20 episodes score 500: episode index 38, step 3900
    assert r.steps_to_threshold == 3900
    assert r.final_eval == 500.0 and r.final_train == 500.0
    lo, hi = stats.RANDOM_RETURNS["CartPole-v1"], 475.0
    n = [(v - lo) / (hi - lo) for v in (lo, 100.0, 500.0)]
    assert r.auc == pytest.approx(((n[0] + n[1]) / 2 * 2000 + (n[1] + n[2]) / 2 * 2000) / 4000)
    summ = stats.summary_table(runs, n_resamples=50)
    assert summ.iloc[0]["reached"] == 1 and summ.iloc[0]["final_eval_iqm"] == 500.0
    pooled = stats.pooled_iqm_table(runs, n_resamples=50)
    assert set(pooled["metric"]) == {"auc", "final_eval_norm"}
