"""Statistics for few-seed RL comparisons: IQM, stratified bootstrap CIs, probability of improvement, performance
profiles, multiple-comparison corrected intervals, the smallest detectable effect, steps to threshold, AUC.

Following Agarwal et al., "Deep RL at the Edge of the Statistical Precipice" (NeurIPS 2021, arXiv 2108.13264) and
its library ``rliable``: report the interquartile mean (IQM) over runs, with percentile bootstrap confidence
intervals that resample runs (seeds) *within* each task (stratified), so every task keeps its number of runs in every
resample. The point statistics are rliable's own (``rliable.metrics.aggregate_iqm``,
``rliable.metrics.probability_of_improvement``). rliable's bootstrap and profile module (``rliable.library``) cannot
be imported with the project's pandas 3.x: rliable 1.2.0 pins ``arch<8``, arch 7.2.0 fails at import under pandas 3
and arch 8 dropped the ``random_state`` keyword that ``rliable.library`` passes. So the stratified resampling (a few
lines, checked against ``scipy.stats.bootstrap``) and the performance profile's run-score distribution are here.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from rliable import metrics as _rly
from scipy import stats as _st

__all__ = [
    "REWARD_THRESHOLDS",
    "RANDOM_RETURNS",
    "iqm",
    "stratified_bootstrap_ci",
    "score_matrix",
    "probability_of_improvement",
    "poi_ci",
    "iqm_difference_ci",
    "performance_profile",
    "bonferroni_confidence",
    "min_detectable_effect",
    "mean_of_last",
    "normalize_return",
    "moving_average",
    "steps_to_threshold",
    "normalized_auc",
    "curve_on_grid",
    "per_run_table",
    "summary_table",
    "pooled_iqm_table",
]

# Gymnasium's registered reward_threshold for each env (gym.spec(env_id).reward_threshold).
REWARD_THRESHOLDS: dict[str, float] = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "MountainCar-v0": -110.0,
    "LunarLander-v3": 200.0,
}
# Mean return of the uniform random policy (100 episodes, seeds 0..99, measured with gymnasium 1.4.0): the 0 of the
# normalised score (random -> 0, threshold -> 1) used to pool environments into one IQM.
RANDOM_RETURNS: dict[str, float] = {
    "CartPole-v1": 23.68,
    "Acrobot-v1": -497.08,
    "MountainCar-v0": -200.0,
    "LunarLander-v3": -191.0,
}
# IQM trims the bottom and top quarter of runs before averaging.
IQM_TRIM = 0.25


def iqm(x: np.ndarray | Sequence[float], axis: int | None = None) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50% of values.

    With ``axis=None`` the values are flattened and this is ``rliable.metrics.aggregate_iqm``; along an axis it is
    the same 25% trimmed mean (``scipy.stats.trim_mean``), vectorised for bootstrap resamples. For n < 4 nothing is
    trimmed (IQM = mean).
    """
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        raise ValueError("x must hold at least one value")
    if axis is None:
        return float(_rly.aggregate_iqm(x))
    return _st.trim_mean(x, IQM_TRIM, axis=axis)


def stratified_bootstrap_ci(
    groups: Mapping[str, Sequence[float]] | Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray] = iqm,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap CI of ``statistic`` over runs pooled from several strata (tasks).

    Args:
        groups: runs per stratum (e.g. ``{env_id: [score per seed]}``); strata may differ in size.
        statistic: called as ``statistic(x, axis=-1)`` on ``[n_resamples, n_runs]``; default :func:`iqm`.
        n_resamples: bootstrap resamples.
        confidence: level of the two-sided interval.
        seed: seeds the resampling generator.

    Returns ``(estimate, low, high)``. Each resample draws, with replacement, as many runs from each stratum as it
    holds (Agarwal et al. 2021). With one stratum this is the ordinary percentile bootstrap.
    """
    values = list(groups.values()) if isinstance(groups, Mapping) else list(groups)
    arrays = [np.asarray(v, dtype=float).ravel() for v in values]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("groups must hold at least one non-empty stratum")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(arrays)
    # [n_resamples, n_runs]: each stratum resampled within itself, then pooled.
    resampled = np.concatenate([a[rng.integers(0, a.size, size=(n_resamples, a.size))] for a in arrays], axis=1)
    boot = np.asarray(statistic(resampled, axis=-1), dtype=float)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(statistic(pooled[None, :], axis=-1)[0]), float(low), float(high)


def score_matrix(runs: "pd.DataFrame", method: str, metric: str) -> np.ndarray:
    """``[n_runs, n_tasks]`` scores of ``method`` from a :func:`per_run_table` (rows: seeds in order; columns:
    envs in sorted order), the layout rliable uses. Every env must have the same number of runs."""
    sub = runs[runs.method == method]
    if sub.empty:
        raise ValueError(f"method {method!r} not in runs (have {sorted(runs.method.unique())})")
    cols = [g.sort_values("seed")[metric].to_numpy(float) for _, g in sub.groupby("env_id", sort=True)]
    if len({c.size for c in cols}) != 1:
        raise ValueError(f"method {method!r}: every env needs the same number of runs, got {[c.size for c in cols]}")
    return np.stack(cols, axis=1)


def _check_matrix(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be a [n_runs, n_tasks] matrix, got shape {x.shape}")
    return x


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y): the chance that a run of X beats a run of Y on a task (ties count half; Mann-Whitney U / (n m)),
    averaged over tasks: ``rliable.metrics.probability_of_improvement`` on ``[n_runs, n_tasks]`` matrices."""
    x, y = _check_matrix("x", x), _check_matrix("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of tasks, got {x.shape[1]} and {y.shape[1]}")
    return float(_rly.probability_of_improvement(x, y))


def _resample(x: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """``[n_resamples, n_runs, n_tasks]``: runs drawn with replacement within each task (stratified)."""
    idx = rng.integers(0, x.shape[0], size=(n_resamples, x.shape[0], x.shape[1]))
    return np.take_along_axis(np.broadcast_to(x, (n_resamples, *x.shape)), idx, axis=1)


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def poi_ci(x: np.ndarray, y: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95,
           seed: int = 0) -> tuple[float, float, float]:
    """:func:`probability_of_improvement` of X over Y and its percentile bootstrap interval (runs of X and of Y
    resampled independently within each task, as rliable). Returns ``(estimate, low, high)``."""
    x, y = _check_matrix("x", x), _check_matrix("y", y)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    bx, by = _resample(x, rng, n_resamples), _resample(y, rng, n_resamples)
    boot = np.array([_rly.probability_of_improvement(a, b) for a, b in zip(bx, by)])
    return (probability_of_improvement(x, y), *_percentile_interval(boot, confidence))


def iqm_difference_ci(x: np.ndarray, y: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """IQM(X) - IQM(Y) over ``[n_runs, n_tasks]`` score matrices, with a stratified percentile bootstrap interval
    (X and Y resampled independently). Returns ``(difference, low, high)``; an interval that excludes 0 is a
    difference at that confidence."""
    x, y = _check_matrix("x", x), _check_matrix("y", y)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    bx = _resample(x, rng, n_resamples).reshape(n_resamples, -1)
    by = _resample(y, rng, n_resamples).reshape(n_resamples, -1)
    boot = iqm(bx, axis=1) - iqm(by, axis=1)
    return (iqm(x) - iqm(y), *_percentile_interval(boot, confidence))


def performance_profile(x: np.ndarray, taus: np.ndarray | Sequence[float], *, n_resamples: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rliable's run-score distribution: for each threshold ``tau`` the fraction of runs scoring above it,
    averaged over tasks, for ``x`` ``[n_runs, n_tasks]``. Returns ``(profile, low, high)``, each ``[len(taus)]``,
    the band a stratified percentile bootstrap."""
    x = _check_matrix("x", x)
    taus = np.asarray(taus, dtype=float)
    if taus.ndim != 1 or taus.size == 0:
        raise ValueError(f"taus must be a non-empty 1-D array, got shape {taus.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")

    def prof(s: np.ndarray) -> np.ndarray:  # s [..., n_runs, n_tasks] -> [..., n_taus]
        return (s[..., None] > taus).mean(axis=-3).mean(axis=-2)

    boot = prof(_resample(x, np.random.default_rng(seed), n_resamples))  # [n_resamples, n_taus]
    alpha = (1.0 - confidence) / 2.0
    return prof(x), np.quantile(boot, alpha, axis=0), np.quantile(boot, 1.0 - alpha, axis=0)


def bonferroni_confidence(n_comparisons: int, family_confidence: float = 0.95) -> float:
    """Per-interval confidence ``1 - (1 - family_confidence) / n_comparisons``: with that many intervals at this
    level, the chance that any misses its true value is at most ``1 - family_confidence`` (Bonferroni)."""
    if not isinstance(n_comparisons, (int, np.integer)) or n_comparisons < 1:
        raise ValueError(f"n_comparisons must be an int >= 1, got {n_comparisons!r}")
    if not (0.0 < family_confidence < 1.0):
        raise ValueError(f"family_confidence must be in (0, 1), got {family_confidence!r}")
    return 1.0 - (1.0 - family_confidence) / n_comparisons


def min_detectable_effect(sigma: float, n: int, *, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest difference of means between two arms of ``n`` runs each, with between-run standard deviation
    ``sigma``, that a two-sided test at ``confidence`` detects with probability ``power`` (normal approximation):
    ``(z_{(1+confidence)/2} + z_power) * sigma * sqrt(2 / n)`` (about ``2.8 sigma sqrt(2/n)`` at 95% / 80%)."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    if not (0.0 < confidence < 1.0) or not (0.0 < power < 1.0):
        raise ValueError(f"confidence and power must be in (0, 1), got {confidence!r}, {power!r}")
    z = _st.norm.ppf((1.0 + confidence) / 2.0) + _st.norm.ppf(power)
    return float(z * sigma * np.sqrt(2.0 / n))


def mean_of_last(values: np.ndarray | Sequence[float], k: int) -> float:
    """Mean of the last ``k`` values (all of them if fewer): the "final" score over the last ``k`` evaluations."""
    v = np.asarray(values, dtype=float)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    return float(v[-k:].mean())


def normalize_return(env_id: str, returns: np.ndarray | float) -> np.ndarray | float:
    """``(R - R_random) / (R_threshold - R_random)``: 0 for the random policy, 1 at Gymnasium's threshold."""
    if env_id not in RANDOM_RETURNS:
        raise ValueError(f"env_id must be one of {sorted(RANDOM_RETURNS)}, got {env_id!r}")
    lo, hi = RANDOM_RETURNS[env_id], REWARD_THRESHOLDS[env_id]
    return (np.asarray(returns, dtype=float) - lo) / (hi - lo)


def moving_average(x: np.ndarray | Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` values; NaN for the first ``window - 1`` positions (no full window yet)."""
    x = np.asarray(x, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    out = np.full(x.shape, np.nan)
    if x.size >= window:
        c = np.cumsum(np.insert(x, 0, 0.0))
        out[window - 1:] = (c[window:] - c[:-window]) / window
    return out


def steps_to_threshold(steps: np.ndarray | Sequence[float], returns: np.ndarray | Sequence[float], threshold: float,
                       window: int = 20) -> float:
    """The env step at which the trailing ``window``-episode mean of training returns first reaches ``threshold``.

    Args:
        steps: env step at the end of each episode, ``[n_episodes]``, increasing.
        returns: the episodes' returns, ``[n_episodes]``.
        threshold: e.g. Gymnasium's reward threshold (:data:`REWARD_THRESHOLDS`).
        window: episodes in the moving average; the first ``window - 1`` episodes cannot qualify.

    Returns the step (float) or NaN if the average never reaches the threshold.
    """
    steps, returns = np.asarray(steps, dtype=float), np.asarray(returns, dtype=float)
    if steps.shape != returns.shape or steps.ndim != 1:
        raise ValueError(f"steps and returns must be 1-D of equal length, got {steps.shape} and {returns.shape}")
    hit = np.flatnonzero(moving_average(returns, window) >= threshold)
    return float(steps[hit[0]]) if hit.size else float("nan")


def normalized_auc(steps: np.ndarray | Sequence[float], values: np.ndarray | Sequence[float], low: float,
                   high: float) -> float:
    """Area under a learning curve, normalised: the trapezoid mean of ``(v - low) / (high - low)`` over the steps.

    1.0 means the curve sat at ``high`` (e.g. the threshold or the env's max return) from the first step to the
    last; 0.0 at ``low`` (e.g. the random policy). Values are not clipped, so a curve above ``high`` gives > 1.
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"steps and values must be 1-D of equal length >= 2, got {x.shape} and {y.shape}")
    if high == low:
        raise ValueError(f"high must differ from low, got {high!r}")
    span = x[-1] - x[0]
    if span <= 0:
        raise ValueError("steps must increase")
    y = (y - low) / (high - low)
    return float(np.trapezoid(y, x) / span)


def curve_on_grid(steps: np.ndarray | Sequence[float], returns: np.ndarray | Sequence[float], grid: np.ndarray,
                  window: int = 20) -> np.ndarray:
    """Trailing ``window``-episode mean of training returns, read at each step of ``grid`` (last episode ended
    at or before that step); NaN before the first full window."""
    steps = np.asarray(steps, dtype=float)
    ma = moving_average(returns, window)
    pos = np.searchsorted(steps, np.asarray(grid, dtype=float), side="right") - 1  # last episode ended <= grid step
    out = np.full(len(grid), np.nan)
    ok = pos >= 0
    out[ok] = ma[pos[ok]]
    return out


def per_run_table(episodes: "pd.DataFrame", evals: "pd.DataFrame", *, window: int = 20, final_evals: int = 5,
                  thresholds: Mapping[str, float] | None = None) -> "pd.DataFrame":
    """One row per run (``env_id``, ``method``, ``seed``) of :func:`helpers.m2dqn.grid.run_grid`'s tables:

    * ``steps_to_threshold``: :func:`steps_to_threshold` of the training returns (NaN if never reached);
    * ``auc``: :func:`normalized_auc` of the greedy-evaluation curve, 0 = random policy, 1 = threshold;
    * ``final_eval``: mean of the last ``final_evals`` greedy-evaluation mean returns; ``final_eval_norm``: the
      same, normalised; ``best_eval``: the highest greedy-evaluation mean return of the run;
    * ``final_train``: mean of the last ``window`` training-episode returns.
    """
    import pandas as pd

    thresholds = dict(REWARD_THRESHOLDS if thresholds is None else thresholds)
    rows = []
    for (env_id, method, seed), ev in evals.groupby(["env_id", "method", "seed"], sort=True):
        ep = episodes[(episodes.env_id == env_id) & (episodes.method == method) & (episodes.seed == seed)]
        ev = ev.sort_values("step")
        thr = thresholds[env_id]
        x = np.concatenate([[0.0], ev["step"].to_numpy(float)])  # the untrained net scores ~random at step 0
        y = np.concatenate([[RANDOM_RETURNS[env_id]], ev["eval/return_mean"].to_numpy(float)])
        rets = ep["charts/episodic_return"].to_numpy(float)
        rows.append({
            "env_id": env_id, "method": method, "seed": seed,
            "steps_to_threshold": steps_to_threshold(ep["step"].to_numpy(float), rets, thr, window),
            "auc": normalized_auc(x, y, RANDOM_RETURNS[env_id], thr),
            "final_eval": mean_of_last(y[1:], final_evals),
            "final_eval_norm": float(normalize_return(env_id, mean_of_last(y[1:], final_evals))),
            "best_eval": float(np.max(y[1:])),
            "final_train": float(np.mean(rets[-window:])) if rets.size else float("nan"),
        })
    return pd.DataFrame(rows)


def summary_table(runs: "pd.DataFrame", *, n_resamples: int = 2000, seed: int = 0) -> "pd.DataFrame":
    """Per (``env_id``, ``method``) from :func:`per_run_table`: runs, how many reached the threshold, the median
    steps to threshold over the runs that reached it, IQM of AUC and of the final greedy return with 95% bootstrap
    CIs (seeds resampled), and mean +- std of the final greedy return."""
    import pandas as pd

    rows = []
    for (env_id, method), g in runs.groupby(["env_id", "method"], sort=False):
        stt = g["steps_to_threshold"].to_numpy(float)
        auc, auc_lo, auc_hi = stratified_bootstrap_ci([g["auc"]], n_resamples=n_resamples, seed=seed)
        fin, fin_lo, fin_hi = stratified_bootstrap_ci([g["final_eval"]], n_resamples=n_resamples, seed=seed)
        rows.append({
            "env_id": env_id, "method": method, "runs": len(g),
            "reached": int(np.isfinite(stt).sum()),
            "median_steps_to_threshold": float(np.nanmedian(stt)) if np.isfinite(stt).any() else float("nan"),
            "auc_iqm": auc, "auc_ci": (auc_lo, auc_hi),
            "final_eval_iqm": fin, "final_eval_ci": (fin_lo, fin_hi),
            "final_eval_mean": float(g["final_eval"].mean()), "final_eval_std": float(g["final_eval"].std(ddof=0)),
        })
    return pd.DataFrame(rows)


def pooled_iqm_table(runs: "pd.DataFrame", metrics: Sequence[str] = ("auc", "final_eval_norm"), *,
                     n_resamples: int = 2000, seed: int = 0) -> "pd.DataFrame":
    """Per method: the IQM over all (env, seed) runs of each normalised metric, with a stratified bootstrap 95% CI
    (seeds resampled within each env). Columns ``method``, ``metric``, ``iqm``, ``low``, ``high``, ``runs``."""
    import pandas as pd

    rows = []
    for method, g in runs.groupby("method", sort=False):
        for metric in metrics:
            strata = {env: sub[metric].to_numpy(float) for env, sub in g.groupby("env_id")}
            est, lo, hi = stratified_bootstrap_ci(strata, n_resamples=n_resamples, seed=seed)
            rows.append({"method": method, "metric": metric, "iqm": est, "low": lo, "high": hi, "runs": len(g)})
    return pd.DataFrame(rows)
