"""helpers.m2dqn.decide: the pre-registered decision rules, the pooled-SD detectable difference and the aggregate
over games, on synthetic per-run tables with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.core import stats
from helpers.m2dqn import decide

D = decide.Decisions()


def _runs(spec: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """A per_run_table from {(env, method): auc per seed}; final_eval_norm = auc (learned games)."""
    rows = [{"env_id": e, "method": m, "seed": s + 1, "auc": float(v), "final_eval_norm": float(v)}
            for (e, m), vals in spec.items() for s, v in enumerate(vals)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("low, high, outcome, verdict", [
    (0.01, 0.20, "better", "reproduced"),
    (0.01, 0.04, "better", "partly"),            # a real gain, all of it below the +0.05 target
    (-0.20, -0.01, "worse", "not reproduced"),
    (-0.03, 0.04, "below target", "not reproduced"),  # rules the target out
    (-0.103, 0.079, "inconclusive", "inconclusive"),  # the re-analysis' M2DQN - DDQN(x0.5) interval
    (-0.064, 0.158, "inconclusive", "inconclusive"),  # the committed "+0.057" interval
])
def test_effect_rules(low, high, outcome, verdict):
    assert decide.effect_outcome(low, high, D.target_effect) == outcome
    assert decide.effect_verdict(outcome, high, D.target_effect) == verdict


def test_noninferiority_rules_and_bad_input():
    assert decide.noninferiority_outcome(-0.05, 0.10, 0.10) == "non-inferior"
    assert decide.noninferiority_outcome(-0.30, -0.12, 0.10) == "inferior"
    assert decide.noninferiority_outcome(-0.15, 0.05, 0.10) == "inconclusive"
    with pytest.raises(ValueError, match="need low <= high"):
        decide.effect_outcome(0.2, 0.1, 0.05)
    with pytest.raises(ValueError, match="margin must be > 0"):
        decide.noninferiority_outcome(0.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="target_effect must be > 0"):
        decide.Decisions(target_effect=0.0)
    with pytest.raises(ValueError, match="min_seeds must be an int >= 2"):
        decide.Decisions(min_seeds=1)


def test_pooled_sd_and_detectable_difference():
    x, y = np.array([0.3, 0.5, 0.4, 0.7, 0.6]), np.array([0.2, 0.25, 0.3, 0.22, 0.28, 0.31])
    want = np.sqrt((4 * x.var(ddof=1) + 5 * y.var(ddof=1)) / 9)
    assert decide.pooled_sd(x, y) == pytest.approx(want, rel=1e-12)
    # equal n: the core helper's formula; the re-analysis' CartPole numbers (SDs 0.066 and 0.112, 10 seeds, 99.0 %)
    assert decide.min_detectable_difference(0.09, 10, 10) == pytest.approx(stats.min_detectable_effect(0.09, 10))
    sd = np.sqrt((0.066 ** 2 + 0.112 ** 2) / 2)
    assert decide.min_detectable_difference(sd, 10, 10, confidence=0.99) == pytest.approx(0.14, abs=0.01)
    assert decide.min_detectable_difference(0.1, 5, 20) > decide.min_detectable_difference(0.1, 10, 10)
    with pytest.raises(ValueError, match="x and y need >= 2 values"):
        decide.pooled_sd([1.0], [1.0, 2.0])


def test_compare_arms_reports_nothing_below_five_seeds():
    runs = _runs({("CartPole-v1", "M2DQN"): np.linspace(0.5, 0.9, 4), ("CartPole-v1", "DDQN"): np.zeros(10)})
    row = decide.compare_arms(runs, "M2DQN", "DDQN", n_boot=100)
    assert row["outcome"] == "fewer than 5 seeds per arm" and row["verdict"] == "not testable here"
    assert np.isnan([row[k] for k in ("difference", "diff_low", "diff_high", "poi", "mde")]).all()


def test_compare_arms_detects_a_large_gain_and_is_inconclusive_on_noise():
    rng = np.random.default_rng(0)
    big = _runs({("CartPole-v1", "M2DQN"): 0.7 + 0.02 * rng.standard_normal(10),
                 ("CartPole-v1", "DDQN"): 0.5 + 0.02 * rng.standard_normal(10)})
    row = decide.compare_arms(big, "M2DQN", "DDQN", n_boot=500)
    assert row["outcome"] == "better" and row["verdict"] == "reproduced" and row["diff_low"] > 0.1
    assert row["poi"] == 1.0
    spread = np.array([0.2, 0.45, 0.8, 0.3, 0.65, 0.5])  # SD 0.21: wide intervals
    noisy = _runs({("CartPole-v1", "M2DQN"): spread + 0.02, ("CartPole-v1", "DDQN"): spread[::-1]})
    row = decide.compare_arms(noisy, "M2DQN", "DDQN", n_boot=500)
    assert row["outcome"] == "inconclusive" and row["diff_low"] < 0 < D.target_effect < row["diff_high"]
    assert row["mde"] > D.target_effect  # 6 noisy seeds cannot resolve +0.05


def test_aggregate_pools_learned_games_and_leaves_out_the_rest():
    rng = np.random.default_rng(1)
    spec = {}
    for env, shift in (("CartPole-v1", 0.10), ("Acrobot-v1", 0.08), ("LunarLander-v3", 0.12)):
        spec[(env, "M2DQN")] = 0.6 + shift + 0.03 * rng.standard_normal(8)
        spec[(env, "DDQN")] = 0.6 + 0.03 * rng.standard_normal(8)
    spec[("MountainCar-v0", "M2DQN")] = 0.02 * rng.standard_normal(8)  # nobody learns it
    spec[("MountainCar-v0", "DDQN")] = 0.02 * rng.standard_normal(8)
    runs = _runs(spec)
    learned, why = decide.game_learned(runs, "MountainCar-v0")
    assert not learned and "no method learns MountainCar-v0" in why
    agg = decide.aggregate_across_games(runs, "M2DQN", "DDQN", n_boot=500)
    assert agg["games"] == ["Acrobot-v1", "CartPole-v1", "LunarLander-v3"]
    assert list(agg["excluded"]) == ["MountainCar-v0"]
    pooled = runs[runs.env_id != "MountainCar-v0"]
    # the IQM over all runs of the pooled games, and P(improvement) = the mean of the per-game ones
    assert agg["iqm_primary"] == pytest.approx(stats.iqm(pooled[pooled.method == "M2DQN"].auc))
    table = decide.per_game_table(runs, "M2DQN", "DDQN", n_boot=200)
    learned_rows = table[table.learned]
    assert agg["poi"] == pytest.approx(learned_rows.poi.mean())
    assert agg["outcome"] == "better" and agg["verdict"] == "reproduced"
    assert (table.confidence == stats.bonferroni_confidence(4)).all()
    # the sentence counts runs per game and games pooled (8 x 3 per arm), not 8 runs in all
    assert agg["n_envs"] == 3 and "8 vs 8 runs per game x 3 games" in decide.describe(agg)
    assert "8 vs 8 runs, pooled SD" in decide.describe(learned_rows.iloc[0].to_dict())


def test_aggregate_uses_the_common_seeds_and_skips_games_with_too_few():
    runs = _runs({("CartPole-v1", "M2DQN"): np.linspace(0.5, 0.9, 8), ("CartPole-v1", "DDQN"): np.full(8, 0.5),
                  ("Acrobot-v1", "M2DQN"): np.linspace(0.5, 0.9, 6), ("Acrobot-v1", "DDQN"): np.full(6, 0.5),
                  ("LunarLander-v3", "M2DQN"): np.full(3, 0.9), ("LunarLander-v3", "DDQN"): np.full(3, 0.5)})
    agg = decide.aggregate_across_games(runs, "M2DQN", "DDQN", n_boot=50)
    assert agg["games"] == ["Acrobot-v1", "CartPole-v1"] and agg["seeds"] == [1, 2, 3, 4, 5, 6]
    assert agg["verdict"] == "reproduced"
    one = decide.aggregate_across_games(runs[runs.env_id != "Acrobot-v1"], "M2DQN", "DDQN", n_boot=50)
    assert one["games"] == ["CartPole-v1"] and one["verdict"] == "not testable here"
    assert "no claim across games" in one["outcome"] and np.isfinite(one["difference"])
    assert agg["excluded"] == {"LunarLander-v3": "3 runs of an arm so far, fewer than 5"}
    assert agg["n_primary"] == 6


def test_baseline_check_is_a_noninferiority_test():
    rng = np.random.default_rng(2)
    runs = _runs({("CartPole-v1", "DQN"): 0.48 + 0.02 * rng.standard_normal(10),
                  ("CartPole-v1", "SB3 DQN"): 0.50 + 0.02 * rng.standard_normal(10)})
    row = decide.baseline_check(runs, "DQN", "SB3 DQN", n_boot=500)
    assert row["outcome"] == "non-inferior" and row["verdict"] == "reproduced" and row["margin"] == 0.10
    worse = _runs({("CartPole-v1", "DQN"): 0.20 + 0.02 * rng.standard_normal(10),
                   ("CartPole-v1", "SB3 DQN"): 0.50 + 0.02 * rng.standard_normal(10)})
    assert decide.baseline_check(worse, "DQN", "SB3 DQN", n_boot=500)["verdict"] == "not reproduced"


def test_describe_and_controls_verdict():
    rng = np.random.default_rng(3)
    runs = _runs({("CartPole-v1", "M2DQN"): 0.7 + 0.02 * rng.standard_normal(10),
                  ("CartPole-v1", "DDQN"): 0.5 + 0.02 * rng.standard_normal(10),
                  ("CartPole-v1", "few"): np.full(3, 0.5)})
    good = decide.compare_arms(runs, "M2DQN", "DDQN", n_boot=200)
    few = decide.compare_arms(runs, "M2DQN", "few", n_boot=200)
    assert "P(M2DQN > DDQN)" in decide.describe(good) and "smallest detectable difference" in decide.describe(good)
    assert decide.describe(few) == "fewer than 5 seeds per arm (10 vs 3): no interval reported"
    mk = lambda o: {"outcome": o, "verdict": decide.effect_verdict(o, 0.1, 0.05)}  # noqa: E731
    assert decide.controls_verdict([mk("better"), mk("better")]) == "reproduced"
    assert decide.controls_verdict([mk("better"), mk("inconclusive")]) == "partly"
    assert decide.controls_verdict([mk("inconclusive"), mk("below target")]) == "inconclusive"
    assert decide.controls_verdict([mk("worse"), mk("below target")]) == "not reproduced"
    assert decide.controls_verdict([mk("better"), few]) == "not testable here"


def test_a_study_part_way_through_reads_as_pending_not_an_error():
    """A resumable study with only M2DQN finished on CartPole: the per-game row says "not testable here" with the
    counts, and the aggregate pools nothing."""
    runs = _runs({("CartPole-v1", "M2DQN"): np.linspace(0.5, 0.9, 8)})
    table = decide.per_game_table(runs, "M2DQN", "DDQN", n_boot=50)
    row = table.iloc[0]
    assert row.verdict == "not testable here" and row.n_primary == 8 and row.n_other == 0
    assert np.isnan(row.difference)
    agg = decide.aggregate_across_games(runs, "M2DQN", "DDQN", n_boot=50)
    assert agg["games"] == [] and agg["verdict"] == "not testable here"


def test_the_game_family_is_the_pre_registered_one_even_part_way_through():
    """Two of four games finished: each is corrected for the four comparisons planned, not the two present, and the
    pending games get a row that says so."""
    rng = np.random.default_rng(4)
    runs = _runs({(env, arm): 0.6 + (0.1 if arm == "M2DQN" else 0.0) + 0.03 * rng.standard_normal(8)
                  for env in ("CartPole-v1", "MountainCar-v0") for arm in ("M2DQN", "DDQN")})
    games = ["CartPole-v1", "Acrobot-v1", "LunarLander-v3", "MountainCar-v0"]
    table = decide.per_game_table(runs, "M2DQN", "DDQN", games=games, n_boot=100)
    assert list(table.env_id) == games and (table.confidence == stats.bonferroni_confidence(4)).all()
    pending = table[table.env_id.isin(["Acrobot-v1", "LunarLander-v3"])]
    assert (pending.verdict == "not testable here").all()
    assert (pending.learned_reason == "no finished runs yet (pending)").all()
    done = table[table.env_id.isin(["CartPole-v1", "MountainCar-v0"])]
    assert (done.verdict == "reproduced").all()
    # fewer comparisons, a narrower interval: correcting for 2 would have been the wrong (optimistic) family
    two = decide.per_game_table(runs, "M2DQN", "DDQN", n_boot=100)
    assert (two.diff_high - two.diff_low).mean() < (done.diff_high - done.diff_low).mean()
    agg = decide.aggregate_across_games(runs, "M2DQN", "DDQN", games=games, n_boot=100)
    assert agg["games"] == ["CartPole-v1", "MountainCar-v0"]
    assert agg["excluded"] == {g: "0 runs of an arm so far, fewer than 5" for g in ("Acrobot-v1", "LunarLander-v3")}


def test_an_interim_look_shows_statistics_but_decides_nothing():
    """Planned: 20 runs per game and arm. CartPole complete, MountainCar at 10 of 20, Acrobot not started: CartPole's
    row decides, MountainCar's is an interim look, and the aggregate pools CartPole alone without a verdict."""
    rng = np.random.default_rng(5)
    spec = {("CartPole-v1", arm): 0.6 + (0.15 if arm == "M2DQN" else 0.0) + 0.03 * rng.standard_normal(20)
            for arm in ("M2DQN", "DDQN")}
    spec |= {("MountainCar-v0", arm): 0.5 + (0.15 if arm == "M2DQN" else 0.0) + 0.03 * rng.standard_normal(10)
             for arm in ("M2DQN", "DDQN")}
    runs = _runs(spec)
    games = ["CartPole-v1", "Acrobot-v1", "MountainCar-v0"]
    table = decide.per_game_table(runs, "M2DQN", "DDQN", games=games, planned_runs=20, n_boot=100).set_index("env_id")
    assert table.loc["CartPole-v1", "verdict"] == "reproduced"
    mc = table.loc["MountainCar-v0"]
    assert mc.verdict == "not testable here" and mc.outcome == "interim (10 of 20 planned runs per arm): better"
    assert np.isfinite(mc.difference)  # the statistics of the look are still shown
    agg = decide.aggregate_across_games(runs, "M2DQN", "DDQN", games=games, planned_runs=20, n_boot=100)
    assert agg["games"] == ["CartPole-v1"] and agg["interim"] and agg["verdict"] == "not testable here"
    assert agg["excluded"]["MountainCar-v0"] == "pending: 10 of 20 planned runs of an arm so far"
    assert agg["outcome"].startswith("interim, Acrobot-v1, MountainCar-v0 pending")
    done = decide.aggregate_across_games(runs[runs.seed <= 10], "M2DQN", "DDQN", games=games[::2], planned_runs=10,
                                         n_boot=100)
    assert not done["interim"] and done["verdict"] == "reproduced" and len(done["games"]) == 2
