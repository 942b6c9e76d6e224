"""The comparisons of notebook 04 as tables: learning-rate selection on the sweep seeds, and the primary method
against every other arm (IQM difference with multiple-comparison corrected intervals, probability of improvement)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from helpers.core import stats

__all__ = ["select_learning_rates", "compare_to", "learning_curves"]


def select_learning_rates(runs: pd.DataFrame, metrics: pd.DataFrame, metric: str = "auc") -> pd.DataFrame:
    """Per swept method, the learning rate with the highest IQM of ``metric`` over the sweep runs.

    ``runs`` is a :func:`helpers.core.stats.per_run_table` whose ``method`` labels are ``"<method> @ <lr>"`` and
    ``metrics`` the grid's metrics table (for each run's ``learning_rate``). Returns ``method``, ``learning_rate``,
    ``iqm`` (one row per method and lr) and ``chosen`` (True on the best lr of each method).
    """
    lr = metrics[["method", "seed", "learning_rate"]]
    df = runs.merge(lr, on=["method", "seed"], how="left")
    if df["learning_rate"].isna().any():
        raise ValueError("every sweep run needs a learning_rate in metrics")
    df["base"] = df["method"].str.split(" @ ").str[0]
    rows = [{"method": base, "learning_rate": float(rate), "runs": len(g), "iqm": stats.iqm(g[metric].to_numpy())}
            for (base, rate), g in df.groupby(["base", "learning_rate"], sort=True)]
    out = pd.DataFrame(rows)
    out["chosen"] = False
    out.loc[out.groupby("method")["iqm"].idxmax(), "chosen"] = True  # ties: the first (smallest) lr
    return out


def compare_to(runs: pd.DataFrame, primary: str, others: Sequence[str], metric: str, *, n_boot: int = 2000,
               family_confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """``primary`` against each of ``others`` on ``metric`` of a :func:`helpers.core.stats.per_run_table`.

    Per comparison: IQMs, their difference with a stratified bootstrap interval at the Bonferroni level for
    ``len(others)`` comparisons (:func:`helpers.core.stats.bonferroni_confidence`), the probability of improvement
    P(primary > other) with its interval at the same level, and ``outcome``: ``"better"`` / ``"worse"`` when the
    difference interval excludes 0, else ``"no detectable difference"``.
    """
    if not others:
        raise ValueError("others must name at least one method")
    conf = stats.bonferroni_confidence(len(others), family_confidence)
    x = stats.score_matrix(runs, primary, metric)
    rows = []
    for k, other in enumerate(others):
        y = stats.score_matrix(runs, other, metric)
        d, lo, hi = stats.iqm_difference_ci(x, y, n_resamples=n_boot, confidence=conf, seed=seed + k)
        p, plo, phi = stats.poi_ci(x, y, n_resamples=n_boot, confidence=conf, seed=seed + k)
        outcome = "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"
        rows.append({"vs": other, "metric": metric, "iqm_primary": stats.iqm(x), "iqm_other": stats.iqm(y),
                     "difference": d, "diff_low": lo, "diff_high": hi, "poi": p, "poi_low": plo, "poi_high": phi,
                     "confidence": conf, "outcome": outcome})
    return pd.DataFrame(rows)


def learning_curves(evals: pd.DataFrame, env_id: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Greedy-evaluation curves of one (env, method): steps ``[n_evals]`` and returns ``[n_seeds, n_evals]``."""
    ev = evals[(evals.env_id == env_id) & (evals.method == method)]
    if ev.empty:
        raise ValueError(f"no evaluations for env {env_id!r}, method {method!r}")
    piv = ev.pivot(index="seed", columns="step", values="eval/return_mean")
    return piv.columns.to_numpy(float), piv.to_numpy(float)
