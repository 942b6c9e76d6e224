"""Tests for helpers.estimators.learning: the exact return of the fast-lane task and seeded, repeatable training runs."""

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.estimators import markov as mt
from helpers.estimators import learning as pg


def test_pg_exact_return_hand_made_and_vs_sampling():
    cfg = pg.FastLaneConfig(T=6, r_safe=0.7)
    big = 30.0
    always = lambda tok: torch.log_softmax(torch.nn.functional.one_hot(torch.full((4,), tok), 3).float() * big, -1)
    assert pg.exact_return(always(pg.FAST), 6, 0.7) == pytest.approx(1.0, abs=1e-6)
    assert pg.exact_return(always(pg.SAFE), 6, 0.7) == pytest.approx(0.7, abs=1e-6)
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(4, 3, generator=g), -1)
    R = pg.sample_rewards(mt.sample_sequences(lp, 40_000, cfg.T, g), cfg.r_safe)
    assert float(R.mean()) == pytest.approx(pg.exact_return(lp, cfg.T, cfg.r_safe), abs=5 * float(R.std()) / 200)


def test_pg_train_repeats_and_logs():
    cfg = pg.FastLaneConfig(T=4, steps=6, batch=16, eval_every=2, seed=5)
    for method in ("uncorrected", "token_tis", "seq_mis"):
        a, b = pg.train(method, cfg), pg.train(method, cfg)
        assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
        assert len(a["kl"]) == 6 and len(a["return_train"]) == 4  # steps 0, 2, 4 and the last
    with pytest.raises(ValueError, match="method"):
        pg.train("nope", cfg)


def test_summarize_gap_closed():
    import numpy as np

    def run(final, cost=0.0):
        ones = np.ones((3, 4))
        return {"return_train": ones * final, "return_rollout": ones * final, "cost": ones * cost,
                "ess_method": ones, "kl": ones * 0.1}

    runs = {"matched": run(1.0), "uncorrected": run(0.8), "fix": run(0.95, cost=0.2)}
    df = pg.summarize(runs, last=2).set_index("method")
    assert df.loc["fix", "gap_closed"] == pytest.approx(0.75)
    assert df.loc["uncorrected", "gap_closed"] == 0 and df.loc["matched", "gap_closed"] == pytest.approx(1.0)
    assert df.loc["fix", "cost_fraction"] == pytest.approx(0.2)
