"""The pre-registered decisions of notebook 04 as functions: what counts as an effect, a non-inferior baseline, an
inconclusive result, the smallest detectable difference, and the aggregate over games.

Rules (fixed before the runs, in :class:`Decisions` and the notebook's first cells):

* primary metric: IQM over runs of the normalised area under the greedy-evaluation curve (``auc``: 0 = random
  policy, 1 = Gymnasium's threshold from step 0), compared by the IQM difference with a stratified percentile
  bootstrap interval at the Bonferroni level for the number of comparisons in the family;
* an effect claim (M2DQN better than X) against the target effect ``delta`` (+0.05):
  ``low > 0`` -> "better" (``reproduced``, or ``partly`` when the whole interval is below ``delta``: a gain smaller
  than the target); ``high < 0`` -> "worse"; ``low <= 0`` and ``high < delta`` -> "below target" (rules the target
  effect out: ``not reproduced``); an interval covering both 0 and ``delta`` -> ``inconclusive``;
* a baseline claim (ours not worse than the reference) against the non-inferiority margin ``m``: ``low > -m`` ->
  "non-inferior" (``reproduced``), ``high < -m`` -> "inferior" (``not reproduced``), else ``inconclusive``;
* nothing - no interval, no outcome - below ``min_seeds`` runs per arm (per game);
* the smallest detectable difference uses the pooled standard deviation of the two arms (``ddof=1``):
  ``(z_{1-alpha/2} + z_power) s_pooled sqrt(1/n_x + 1/n_y)``;
* across games (Agarwal et al., "Deep RL at the edge of the statistical precipice", NeurIPS 2021, and its
  ``rliable`` library): the IQM over all runs of all included games of the normalised AUC, the difference
  interval from a bootstrap stratified by game, and the probability of improvement per game and pooled (the mean
  over games of P(X > Y)); a game where no arm learns (:func:`game_learned`) is left out of the pool, with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

from helpers.core import stats

__all__ = ["Decisions", "LEARNED_LEVEL", "pooled_sd", "min_detectable_difference", "effect_outcome",
           "effect_verdict", "noninferiority_outcome", "compare_arms", "per_game_table", "game_learned",
           "aggregate_across_games", "baseline_check", "describe", "controls_verdict"]

# A game counts as learned when, for some arm, at least half of the runs end with a normalised final greedy return
# above 0.1: a tenth of the way from the random policy to Gymnasium's threshold. Below it the normalised AUC
# measures exploration noise around the random policy's score, and pooling it would dilute every other game.
LEARNED_LEVEL = 0.1
NOT_ENOUGH = "fewer than {k} seeds per arm"


@dataclass(frozen=True)
class Decisions:
    """The pre-registered decision rules (see the module docstring)."""

    primary_metric: str = "auc"
    """per-run score compared (a column of :func:`helpers.core.stats.per_run_table`)"""
    target_effect: float = 0.05
    """delta: the smallest improvement of the primary metric that would support the paper's claim"""
    ni_margin: float = 0.10
    """m: how far below the reference (primary metric) our baseline may be and still count as at its level"""
    family_confidence: float = 0.95
    """confidence of the whole family of intervals (Bonferroni-split over its comparisons)"""
    min_seeds: int = 5
    """no interval or outcome is reported with fewer runs per arm"""
    power: float = 0.8
    """power of the smallest detectable difference"""

    def __post_init__(self) -> None:
        if not self.target_effect > 0:
            raise ValueError(f"target_effect must be > 0, got {self.target_effect!r}")
        if not self.ni_margin > 0:
            raise ValueError(f"ni_margin must be > 0, got {self.ni_margin!r}")
        if not 0 < self.family_confidence < 1 or not 0 < self.power < 1:
            raise ValueError(f"family_confidence and power must be in (0, 1), got {self.family_confidence!r}, "
                             f"{self.power!r}")
        if not isinstance(self.min_seeds, int) or self.min_seeds < 2:
            raise ValueError(f"min_seeds must be an int >= 2, got {self.min_seeds!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pooled_sd(x: Sequence[float], y: Sequence[float]) -> float:
    """``sqrt(((n_x - 1) s_x^2 + (n_y - 1) s_y^2) / (n_x + n_y - 2))`` of two samples (each >= 2 values)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.size < 2 or y.size < 2:
        raise ValueError(f"x and y need >= 2 values each, got {x.size} and {y.size}")
    return float(np.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)))


def min_detectable_difference(sd: float, n_x: int, n_y: int, *, confidence: float = 0.95,
                              power: float = 0.8) -> float:
    """The smallest difference of means a two-sided test at ``confidence`` detects with probability ``power``
    between arms of ``n_x`` and ``n_y`` runs with common standard deviation ``sd`` (normal approximation):
    ``(z_{(1+confidence)/2} + z_power) sd sqrt(1/n_x + 1/n_y)``; equals
    :func:`helpers.core.stats.min_detectable_effect` when ``n_x == n_y``."""
    if n_x < 2 or n_y < 2:
        raise ValueError(f"n_x and n_y must be >= 2, got {n_x!r}, {n_y!r}")
    if not sd >= 0:
        raise ValueError(f"sd must be >= 0, got {sd!r}")
    if not 0 < confidence < 1 or not 0 < power < 1:
        raise ValueError(f"confidence and power must be in (0, 1), got {confidence!r}, {power!r}")
    z = _st.norm.ppf((1.0 + confidence) / 2.0) + _st.norm.ppf(power)
    return float(z * sd * np.sqrt(1.0 / n_x + 1.0 / n_y))


def effect_outcome(low: float, high: float, target: float) -> str:
    """``"better"`` (low > 0), ``"worse"`` (high < 0), ``"below target"`` (low <= 0 and high < target: the target
    effect is ruled out) or ``"inconclusive"`` (the interval covers both 0 and the target)."""
    if not low <= high:
        raise ValueError(f"need low <= high, got {low!r}, {high!r}")
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if high < target:
        return "below target"
    return "inconclusive"


def effect_verdict(outcome: str, high: float, target: float) -> str:
    """The claim's verdict from :func:`effect_outcome`: better -> ``reproduced`` (``partly`` when ``high < target``:
    a real gain, smaller than the target), worse / below target -> ``not reproduced``, inconclusive ->
    ``inconclusive``, too few seeds -> ``not testable here``."""
    if outcome == "better":
        return "reproduced" if high >= target else "partly"
    if outcome in ("worse", "below target"):
        return "not reproduced"
    if outcome == "inconclusive":
        return "inconclusive"
    return "not testable here"


def noninferiority_outcome(low: float, high: float, margin: float) -> str:
    """Ours - reference: ``"non-inferior"`` (low > -margin), ``"inferior"`` (high < -margin), else
    ``"inconclusive"``."""
    if not low <= high:
        raise ValueError(f"need low <= high, got {low!r}, {high!r}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    if low > -margin:
        return "non-inferior"
    if high < -margin:
        return "inferior"
    return "inconclusive"


def compare_arms(runs: pd.DataFrame, primary: str, other: str, *, decisions: Decisions = Decisions(),
                 metric: str | None = None, n_comparisons: int = 1, n_boot: int = 2000, seed: int = 0,
                 ) -> dict[str, Any]:
    """``primary`` against ``other`` on ``metric`` (default the primary metric) over every env in ``runs`` (a
    :func:`helpers.core.stats.per_run_table`; with several envs, the pooled IQM with a bootstrap stratified by env).

    Returns a dict: ``arm`` (= ``primary``), ``vs``, ``metric``, ``n_primary`` / ``n_other`` (runs per env),
    ``n_envs`` (envs pooled), ``iqm_primary``,
    ``iqm_other``, ``difference``, ``diff_low``, ``diff_high`` (at the Bonferroni level ``confidence`` for
    ``n_comparisons``), ``poi`` / ``poi_low`` / ``poi_high`` (P(primary > other), mean over envs),
    ``pooled_sd`` (within env, both arms), ``mde`` (:func:`min_detectable_difference` at ``confidence``),
    ``outcome`` (:func:`effect_outcome` against the target) and ``verdict``. With fewer than ``min_seeds`` runs per
    arm in some env, every statistic but the counts is NaN and the outcome says so.
    """
    metric = metric or decisions.primary_metric
    conf = stats.bonferroni_confidence(n_comparisons, decisions.family_confidence)
    nan_keys = ("iqm_primary", "iqm_other", "difference", "diff_low", "diff_high", "poi", "poi_low", "poi_high",
                "pooled_sd", "mde")
    absent = [m for m in (primary, other) if m not in set(runs.method)]
    if absent:  # a resumable study part-way through: an arm has no finished run yet
        counts = {m: int((runs.method == m).sum()) for m in (primary, other)}
        return {"arm": primary, "vs": other, "metric": metric, "n_primary": counts[primary],
                "n_other": counts[other], "confidence": conf, **dict.fromkeys(nan_keys, float("nan")),
                "outcome": NOT_ENOUGH.format(k=decisions.min_seeds), "verdict": "not testable here"}
    x, y = stats.score_matrix(runs, primary, metric), stats.score_matrix(runs, other, metric)  # [runs, envs]
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{primary!r} and {other!r} must cover the same envs, got {x.shape[1]} and {y.shape[1]}")
    row: dict[str, Any] = {"arm": primary, "vs": other, "metric": metric, "n_primary": int(x.shape[0]),
                           "n_other": int(y.shape[0]), "n_envs": int(x.shape[1]), "confidence": conf}
    if min(x.shape[0], y.shape[0]) < decisions.min_seeds:
        return {**row, **dict.fromkeys(nan_keys, float("nan")),
                "outcome": NOT_ENOUGH.format(k=decisions.min_seeds), "verdict": "not testable here"}
    d, lo, hi = stats.iqm_difference_ci(x, y, n_resamples=n_boot, confidence=conf, seed=seed)
    p, plo, phi = stats.poi_ci(x, y, n_resamples=n_boot, confidence=conf, seed=seed)
    # within-env pooled SD: deviations from each env's mean, both arms, ddof = one per (env, arm)
    resid = np.concatenate([(x - x.mean(axis=0)).ravel(), (y - y.mean(axis=0)).ravel()])
    sd = float(np.sqrt((resid ** 2).sum() / (resid.size - 2 * x.shape[1])))
    mde = min_detectable_difference(sd, x.size, y.size, confidence=conf, power=decisions.power)
    outcome = effect_outcome(lo, hi, decisions.target_effect)
    return {**row, "iqm_primary": stats.iqm(x), "iqm_other": stats.iqm(y), "difference": d, "diff_low": lo,
            "diff_high": hi, "poi": p, "poi_low": plo, "poi_high": phi, "pooled_sd": sd, "mde": mde,
            "outcome": outcome, "verdict": effect_verdict(outcome, hi, decisions.target_effect)}


def game_learned(runs: pd.DataFrame, env_id: str, level: float = LEARNED_LEVEL) -> tuple[bool, str]:
    """Whether some arm learns ``env_id``: at least half of its runs end with ``final_eval_norm > level``.
    Returns ``(learned, reason)``, the reason naming the best arm's fraction."""
    g = runs[runs.env_id == env_id]
    if g.empty:
        raise ValueError(f"no runs of env {env_id!r}")
    frac = g.groupby("method")["final_eval_norm"].apply(lambda s: float((s > level).mean()))
    best = frac.idxmax()
    learned = bool(frac.max() >= 0.5)
    reason = (f"{frac.max():.0%} of {best}'s runs end above {level:g} of the random-to-threshold range"
              + ("" if learned else f" (< 50% for every arm: no method learns {env_id} at this budget)"))
    return learned, reason


def _counts(runs: pd.DataFrame, env: str, arms: Sequence[str]) -> list[int]:
    return [int(((runs.env_id == env) & (runs.method == m)).sum()) for m in arms]


def per_game_table(runs: pd.DataFrame, primary: str, other: str, *, decisions: Decisions = Decisions(),
                   games: Sequence[str] | None = None, planned_runs: int | None = None, n_boot: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """One :func:`compare_arms` row per game (``env_id`` first), Bonferroni-corrected over ``games`` (the
    pre-registered family: pass it, so that a study part-way through corrects for every game it will compare; default
    the games in ``runs``), plus ``learned`` / ``learned_reason`` (:func:`game_learned`). A game without runs yet
    gets a ``not testable here`` row. ``planned_runs`` (the runs per game and arm planned in advance): a game with
    fewer is an interim look - its statistics are shown, its verdict is ``not testable here`` until it is complete
    (deciding at every look would inflate the error rate)."""
    games = sorted(runs.env_id.unique()) if games is None else list(games)
    if not games:
        raise ValueError("games must name at least one env")
    rows = []
    for k, env in enumerate(games):
        sub = runs[runs.env_id == env]
        if sub.empty:
            learned, why = None, "no finished runs yet (pending)"
        else:
            learned, why = game_learned(sub, env)
        row = compare_arms(sub, primary, other, decisions=decisions, n_comparisons=len(games), n_boot=n_boot,
                           seed=seed + k)
        have = min(_counts(runs, env, (primary, other)))
        if planned_runs is not None and have < planned_runs and row["verdict"] != "not testable here":
            row = {**row, "outcome": f"interim ({have} of {planned_runs} planned runs per arm): {row['outcome']}",
                   "verdict": "not testable here"}
        rows.append({"env_id": env, **row, "learned": learned, "learned_reason": why})
    return pd.DataFrame(rows)


def aggregate_across_games(runs: pd.DataFrame, primary: str, other: str, *, decisions: Decisions = Decisions(),
                           games: Sequence[str] | None = None, planned_runs: int | None = None,
                           n_boot: int = 2000, seed: int = 0, min_games: int = 2) -> dict[str, Any]:
    """The multi-game claim: :func:`compare_arms` over the pooled runs of the games that some arm learns and that
    hold ``min_seeds`` runs of both arms (one comparison, at ``family_confidence``), on the seeds every pooled game
    and arm has (rliable's ``[runs, games]`` layout needs the same count everywhere). Adds ``games`` (pooled),
    ``seeds`` (used) and ``excluded`` (``{env: reason}``). Fewer than ``min_games`` pooled games: the statistics,
    but verdict ``not testable here`` (a claim across games needs more than one). ``planned_runs``: a game with
    fewer runs of an arm is pending and left out of the pool, and while any of ``games`` is pending the statistics
    over the complete games are an interim look (``interim`` True), verdict ``not testable here``."""
    games = sorted(runs.env_id.unique()) if games is None else list(games)
    included, excluded, pending = [], {}, []
    for env in games:
        sub = runs[(runs.env_id == env) & runs.method.isin([primary, other])]
        counts = _counts(runs, env, (primary, other))
        if planned_runs is not None and min(counts) < planned_runs:
            excluded[env] = f"pending: {min(counts)} of {planned_runs} planned runs of an arm so far"
            pending.append(env)
            continue
        if min(counts) < decisions.min_seeds:
            excluded[env] = f"{min(counts)} runs of an arm so far, fewer than {decisions.min_seeds}"
            continue
        learned, why = game_learned(sub, env)
        (included.append(env) if learned else excluded.__setitem__(env, why))
    if not included:
        return {"vs": other, "games": [], "seeds": [], "excluded": excluded, "outcome": "no game to pool",
                "verdict": "not testable here", "interim": bool(pending)}
    pool = runs[runs.env_id.isin(included) & runs.method.isin([primary, other])]
    seeds = sorted(set.intersection(*(set(g.seed) for _, g in pool.groupby(["env_id", "method"]))))
    out = compare_arms(pool[pool.seed.isin(seeds)], primary, other, decisions=decisions, n_boot=n_boot, seed=seed)
    if pending:  # an interim look: decided when every planned game is in
        out = {**out, "outcome": f"interim, {', '.join(pending)} pending: {out['outcome']}",
               "verdict": "not testable here"}
    elif len(included) < min_games:  # one game is that game's comparison, not a claim across games
        out = {**out, "outcome": f"{len(included)} game pooled, fewer than {min_games}: no claim across games",
               "verdict": "not testable here"}
    return {**out, "games": included, "seeds": seeds, "excluded": excluded, "interim": bool(pending)}


def baseline_check(runs: pd.DataFrame, ours: str, reference: str, *, decisions: Decisions = Decisions(),
                   metric: str | None = None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Non-inferiority of ``ours`` against ``reference`` (e.g. our DQN vs Stable-Baselines3's DQN: the same
    algorithm): :func:`compare_arms` of ours - reference at ``family_confidence``, its ``outcome`` replaced by
    :func:`noninferiority_outcome` with ``ni_margin`` and its verdict by reproduced / not reproduced /
    inconclusive."""
    row = compare_arms(runs, ours, reference, decisions=decisions, metric=metric, n_boot=n_boot, seed=seed)
    if row["verdict"] == "not testable here":
        return {**row, "margin": decisions.ni_margin}
    outcome = noninferiority_outcome(row["diff_low"], row["diff_high"], decisions.ni_margin)
    verdict = {"non-inferior": "reproduced", "inferior": "not reproduced"}.get(outcome, "inconclusive")
    return {**row, "margin": decisions.ni_margin, "outcome": outcome, "verdict": verdict}


def describe(row: dict[str, Any], primary: str = "M2DQN") -> str:
    """One sentence of a :func:`compare_arms` / :func:`baseline_check` row: the IQMs, the difference with its
    interval and level, P(improvement), the pooled SD and the smallest detectable difference - or only the counts
    when there are too few seeds (nothing else is printed below ``min_seeds``)."""
    if row["verdict"] == "not testable here" and not np.isfinite(row.get("difference", np.nan)):
        return f"{row['outcome']} ({row['n_primary']} vs {row['n_other']}): no interval reported"
    n_envs = int(row.get("n_envs", 1))
    runs = (f"{row['n_primary']} vs {row['n_other']} runs" if n_envs == 1 else
            f"{row['n_primary']} vs {row['n_other']} runs per game x {n_envs} games")
    return (f"IQM {row['iqm_primary']:.3f} vs {row['iqm_other']:.3f}, difference {row['difference']:+.3f} "
            f"[{row['diff_low']:+.3f}, {row['diff_high']:+.3f}] at {row['confidence']:.1%}, "
            f"P({primary} > {row['vs']}) {row['poi']:.2f} [{row['poi_low']:.2f}, {row['poi_high']:.2f}], "
            f"{runs}, pooled SD {row['pooled_sd']:.3f}, smallest detectable "
            f"difference {row['mde']:.3f}: {row['outcome']}")


def controls_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """The verdict of "the gain comes from the max-mean loss" from the primary's :func:`compare_arms` rows against
    the controls: ``reproduced`` when it beats every control (outcome "better"), ``partly`` when it beats some,
    ``inconclusive`` when it beats none and some interval covers both 0 and the target, ``not reproduced`` when every
    comparison rules the target out (or is worse), ``not testable here`` when any has too few seeds."""
    if not rows:
        raise ValueError("rows must hold at least one comparison with a control")
    outcomes = [r["outcome"] for r in rows]
    if any(r["verdict"] == "not testable here" for r in rows):
        return "not testable here"
    better = sum(o == "better" for o in outcomes)
    if better == len(outcomes):
        return "reproduced"
    if better:
        return "partly"
    return "inconclusive" if "inconclusive" in outcomes else "not reproduced"
