"""Seed-paired comparisons of two arms, decided the way a pre-registered study decides them.

Two arms run with the same seeds (same prompts, same start, same evaluation draws) give one *difference* per seed,
``d_i = metric(arm, seed i) - metric(reference, seed i)``. Everything here works on those differences:

* :func:`paired_t` - the mean difference, its standard error, the two-sided Student-t interval and p-value
  (``scipy.stats.ttest_rel`` on the two columns gives the same t and p);
* :func:`tost` - the equivalence test (two one-sided t tests, Schuirmann 1987) against a margin ``delta`` fixed
  before the runs: "like the reference" is concluded only when the difference is shown to lie inside
  ``(-delta, +delta)``, i.e. when the ``1 - 2 alpha`` interval lies inside the margin - never from a non-significant
  difference;
* :func:`holm` - Holm's step-down adjustment of a family of p-values (controls the family-wise error rate at alpha
  for any dependence between the tests; ``statsmodels.stats.multitest.multipletests(method="holm")``);
* :func:`paired_mde` - the smallest true mean difference the seeds detect with the stated power, from the paired SD
  (the noncentral-t power of the one-sample t test, solved for the effect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize as _opt
from scipy import stats as _st

__all__ = ["PairedTest", "paired_t", "tost", "holm", "paired_mde"]


def _diffs(d: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(d, dtype=float).ravel()
    if x.size < 2:
        raise ValueError(f"need at least 2 paired differences, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError("paired differences must be finite (a run with a missing evaluation?)")
    return x


def _check_alpha(name: str, alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison: ``mean`` difference, its ``se``, the between-seed ``sd`` of the differences, ``n``
    seeds, the two-sided ``confidence`` interval ``[low, high]`` and ``p`` (H0: mean difference 0)."""

    mean: float
    se: float
    sd: float
    n: int
    low: float
    high: float
    p: float
    confidence: float


def paired_t(d: Sequence[float] | np.ndarray, confidence: float = 0.95) -> PairedTest:
    """Student-t inference on the mean of paired differences ``d`` (one per seed)."""
    x = _diffs(d)
    _check_alpha("confidence", confidence)
    n = x.size
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se == 0.0:  # every seed gave the same difference: p is 0 unless that difference is 0
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(2 * _st.t.sf(abs(mean) / se, n - 1))
    return PairedTest(mean, se, sd, n, mean - half, mean + half, p, confidence)


def tost(d: Sequence[float] | np.ndarray, margin: float) -> float:
    """p-value of the two one-sided tests of equivalence: H0 ``mean <= -margin`` or ``mean >= +margin``.

    The larger of the two one-sided p-values; ``p < alpha`` concludes ``|mean difference| < margin`` (equivalently,
    the ``1 - 2 alpha`` t interval lies inside ``(-margin, margin)``)."""
    x = _diffs(d)
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    n = x.size
    mean, se = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return 0.0 if abs(mean) < margin else 1.0
    p_low = float(_st.t.sf((mean + margin) / se, n - 1))  # H0: mean <= -margin
    p_high = float(_st.t.cdf((mean - margin) / se, n - 1))  # H0: mean >= +margin
    return max(p_low, p_high)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values, in the input order: sorted ascending, ``p_(i) * (m - i)`` (i from 0), made monotone
    by a running maximum and capped at 1. Reject hypothesis j at family level alpha when ``adjusted[j] <= alpha``."""
    p = np.asarray(pvalues, dtype=float).ravel()
    if p.size == 0:
        return p
    if np.any((p < 0) | (p > 1) | ~np.isfinite(p)):
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return out


def paired_mde(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t test at level ``alpha`` detects with probability
    ``power``, for ``n`` seeds whose differences have standard deviation ``sd``: the effect ``delta`` at which the
    noncentral t (noncentrality ``delta sqrt(n) / sd``, ``n - 1`` degrees of freedom) exceeds the critical value
    with probability ``power``. About ``(t_{1-alpha/2} + t_power) sd / sqrt(n)``."""
    _check_alpha("alpha", alpha)
    _check_alpha("power", power)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not sd >= 0 or not math.isfinite(sd):
        raise ValueError(f"sd must be a finite number >= 0, got {sd!r}")
    if sd == 0:
        return 0.0
    df = n - 1
    crit = float(_st.t.ppf(1 - alpha / 2, df))

    def power_at(nc: float) -> float:
        v = float(_st.nct.sf(crit, df, nc) + _st.nct.cdf(-crit, df, nc))
        return 1.0 if math.isnan(v) else v  # scipy's nct is NaN far in the tail, where the power is 1

    # The root lies below crit + z_power + a margin, except for the heavy t tails of very few seeds (n = 2 at a
    # Holm-corrected level), where the bracket grows until the power is reached.
    hi = crit + float(_st.norm.ppf(power)) + 10.0
    while power_at(hi) < power:
        hi *= 4.0
        if hi > 1e6:
            return math.inf
    nc = _opt.brentq(lambda c: power_at(c) - power, 0.0, hi)
    return nc * sd / math.sqrt(n)
