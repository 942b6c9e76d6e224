"""helpers.core.paired against scipy / statsmodels: paired t, TOST, Holm, the detectable difference."""

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from helpers.core.paired import holm, paired_mde, paired_t, tost


@pytest.mark.parametrize("n", [2, 5, 16])
def test_paired_t_matches_scipy_ttest_rel(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.3, 0.05, n), rng.normal(0.29, 0.05, n)
    r = paired_t(a - b, confidence=0.9)
    ref = stats.ttest_rel(a, b)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.mean == pytest.approx(np.mean(a - b), rel=1e-12)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert (r.low, r.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r.n == n and r.se == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(n))


def test_paired_t_degenerate_and_bad_input():
    assert paired_t([0.125, 0.125, 0.125]).p == 0.0
    assert paired_t([0.0, 0.0]).p == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_t([0.1])
    with pytest.raises(ValueError, match="finite"):
        paired_t([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        paired_t([0.1, 0.2], confidence=1.5)


@pytest.mark.parametrize("shift", [0.0, 0.004, 0.009, -0.012])
def test_tost_is_the_larger_of_two_one_sided_scipy_tests(shift):
    rng = np.random.default_rng(7)
    d = rng.normal(shift, 0.01, 16)
    margin = 0.01
    lo = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    hi = stats.ttest_1samp(d, margin, alternative="less").pvalue
    assert tost(d, margin) == pytest.approx(max(lo, hi), rel=1e-10)


def test_tost_agrees_with_the_90_percent_interval():
    rng = np.random.default_rng(3)
    for _ in range(50):
        d = rng.normal(rng.uniform(-0.01, 0.01), 0.01, 12)
        r = paired_t(d, confidence=0.90)
        inside = -0.008 < r.low and r.high < 0.008
        assert (tost(d, 0.008) < 0.05) == inside


def test_tost_rejects_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        tost([0.1, 0.2], 0.0)


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(0)
    for m in (1, 3, 7, 12):
        p = rng.uniform(0, 0.2, m)
        ref = multipletests(p, method="holm")[1]
        np.testing.assert_allclose(holm(p), ref, rtol=1e-12)
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="p-values"):
        holm([0.1, 1.2])


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_paired_mde_matches_statsmodels_power(n):
    sd = 0.013
    es = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert paired_mde(sd, n) == pytest.approx(es * sd, rel=1e-4)


def test_paired_mde_shrinks_with_seeds_and_checks_input():
    assert paired_mde(0.01, 32) < paired_mde(0.01, 16) < paired_mde(0.01, 8)
    assert paired_mde(0.0, 8) == 0.0
    assert 0.01 < paired_mde(0.001, 2, alpha=0.05 / 7) < math.inf  # two seeds at a Holm level: large, but finite
    with pytest.raises(ValueError, match="n must"):
        paired_mde(0.01, 1)
    with pytest.raises(ValueError, match="power"):
        paired_mde(0.01, 8, power=1.0)
