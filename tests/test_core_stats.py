"""helpers.core.stats against hand computations."""

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
    first = stats.per_run_table(ep, ev).iloc[0]
    assert first.final_eval == 300.0 and first.best_eval == 500.0  # default: mean of the last 5 (here both) evals
    runs = stats.per_run_table(ep, ev, final_evals=1)
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


# -- rliable-backed statistics --------------------------------------------------------------------------------------
def test_iqm_is_rliables():
    from rliable import metrics as rly

    x = np.random.default_rng(5).normal(size=(13, 3))
    assert stats.iqm(x) == pytest.approx(rly.aggregate_iqm(x))
    np.testing.assert_allclose(stats.iqm(x.T, axis=1), [rly.aggregate_iqm(c) for c in x.T])


def test_probability_of_improvement_by_hand():
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[0.0], [2.0]])
    # pairs (x > y): 1>0, 2>0, 3>0, 3>2 -> 4; tie 2=2 -> 0.5; total 6 pairs
    assert stats.probability_of_improvement(x, y) == pytest.approx(4.5 / 6)
    assert stats.probability_of_improvement(y, x) == pytest.approx(1.5 / 6)
    # averaged over tasks: task 2 is a certain win
    x2, y2 = np.c_[x[:2, 0], [5.0, 6.0]], np.c_[y[:, 0], [0.0, 1.0]]
    assert stats.probability_of_improvement(x2, y2) == pytest.approx((stats.probability_of_improvement(
        x2[:, :1], y2[:, :1]) + 1.0) / 2)
    with pytest.raises(ValueError, match="tasks"):
        stats.probability_of_improvement(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="x must"):
        stats.probability_of_improvement(np.zeros(3), np.zeros((3, 1)))


def test_poi_and_difference_intervals():
    rng = np.random.default_rng(2)
    x, y = rng.normal(2.0, 1.0, (20, 1)), rng.normal(0.0, 1.0, (20, 1))
    p, lo, hi = stats.poi_ci(x, y, n_resamples=300, seed=1)
    assert lo <= p <= hi and lo > 0.5  # a 2-sigma shift with 20 runs each is a clear improvement
    assert (p, lo, hi) == stats.poi_ci(x, y, n_resamples=300, seed=1)
    d, dlo, dhi = stats.iqm_difference_ci(x, y, n_resamples=300, seed=1)
    assert d == pytest.approx(stats.iqm(x) - stats.iqm(y)) and 0 < dlo <= d <= dhi
    # identical samples: the difference interval is centred on 0 and covers it
    d0, lo0, hi0 = stats.iqm_difference_ci(x, x, n_resamples=300)
    assert d0 == 0.0 and lo0 < 0 < hi0
    # a wider (Bonferroni) level gives a wider interval
    _, wlo, whi = stats.iqm_difference_ci(x, y, n_resamples=300, seed=1, confidence=0.99)
    assert wlo <= dlo and whi >= dhi
    with pytest.raises(ValueError, match="confidence"):
        stats.poi_ci(x, y, confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        stats.iqm_difference_ci(x, y, n_resamples=0)


def test_performance_profile_by_hand():
    x = np.array([[0.1, 0.9], [0.5, 0.2], [0.8, 0.7]])  # 3 runs x 2 tasks
    prof, lo, hi = stats.performance_profile(x, [0.0, 0.3, 0.75, 1.0], n_resamples=200)
    # tau 0.3: task 1 -> 2/3 above, task 2 -> 2/3 above; tau 0.75: 1/3 and 1/3
    np.testing.assert_allclose(prof, [1.0, 2 / 3, 1 / 3, 0.0])
    assert np.all(lo <= prof + 1e-12) and np.all(prof <= hi + 1e-12)
    assert lo[0] == hi[0] == 1.0 and lo[-1] == hi[-1] == 0.0
    with pytest.raises(ValueError, match="taus"):
        stats.performance_profile(x, [])


def test_bonferroni_and_min_detectable_effect():
    assert stats.bonferroni_confidence(1) == pytest.approx(0.95)
    assert stats.bonferroni_confidence(5) == pytest.approx(0.99)
    # the textbook 2.8 sigma sqrt(2/n) at 95% / 80% (z 1.960 + 0.842)
    assert stats.min_detectable_effect(1.0, 2) == pytest.approx(2.8016, abs=1e-3)
    assert stats.min_detectable_effect(168.0, 5) == pytest.approx(2.8016 * 168 * math.sqrt(2 / 5), rel=1e-3)
    # 4x the seeds halves it
    assert stats.min_detectable_effect(1.0, 40) == pytest.approx(stats.min_detectable_effect(1.0, 10) / 2)
    for bad, name in ((dict(n_comparisons=0), "n_comparisons"), (dict(n_comparisons=2, family_confidence=1.0),
                                                                  "family_confidence")):
        with pytest.raises(ValueError, match=name):
            stats.bonferroni_confidence(**bad)
    with pytest.raises(ValueError, match="n must"):
        stats.min_detectable_effect(1.0, 1)
    with pytest.raises(ValueError, match="sigma"):
        stats.min_detectable_effect(-1.0, 5)


def test_score_matrix_and_mean_of_last():
    runs = pd.DataFrame({"env_id": ["b", "a", "a", "b"], "method": "M", "seed": [2, 2, 1, 1],
                         "auc": [4.0, 2.0, 1.0, 3.0]})
    np.testing.assert_array_equal(stats.score_matrix(runs, "M", "auc"), [[1.0, 3.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="method"):
        stats.score_matrix(runs, "N", "auc")
    with pytest.raises(ValueError, match="same number"):
        stats.score_matrix(runs.iloc[:3], "M", "auc")
    assert stats.mean_of_last([1, 2, 3, 4, 5, 6], 5) == 4.0
    assert stats.mean_of_last([7.0], 5) == 7.0
    with pytest.raises(ValueError, match="k must"):
        stats.mean_of_last([1.0], 0)
