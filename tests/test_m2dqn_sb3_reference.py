"""helpers.m2dqn.sb3_reference: Stable-Baselines3's DQN driven by the zoo settings and scored with our protocol."""

import numpy as np
import pytest

from helpers.m2dqn import dqn, grid, sb3_reference

# Small and quick: a 32x32 net, 10 gradient steps every 100 env steps.
TINY = dict(total_steps=1500, learning_starts=500, eval_interval=500, eval_episodes=2, train_frequency=100,
            grad_steps=10, hidden=(32, 32))


def test_sb3_kwargs_are_the_zoo_settings():
    kw = sb3_reference.sb3_kwargs(dqn.make_args("CartPole-v1", algo="dqn", seed=5))
    assert {k: kw[k] for k in ("learning_rate", "batch_size", "buffer_size", "learning_starts", "gamma",
                               "target_update_interval", "train_freq", "gradient_steps", "exploration_fraction",
                               "exploration_initial_eps", "exploration_final_eps", "max_grad_norm", "tau", "seed")} == dict(
        learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1_000, gamma=0.99,
        target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
        exploration_initial_eps=1.0, exploration_final_eps=0.04, max_grad_norm=10.0, tau=1.0, seed=5)
    assert kw["policy_kwargs"] == {"net_arch": [256, 256]}
    acro = sb3_reference.sb3_kwargs(dqn.make_args("Acrobot-v1", algo="dqn"))
    assert (acro["train_freq"], acro["gradient_steps"]) == (4, 4)  # the zoo's gradient_steps -1 at train_freq 4
    assert sb3_reference.sb3_kwargs(dqn.make_args("CartPole-v1", algo="dqn", max_grad_norm=0.0))[
        "max_grad_norm"] == float("inf")


@pytest.mark.parametrize("kw,name", [(dict(algo="ddqn"), "algo"), (dict(algo="m2dqn", num_batches=2), "algo"),
                                     (dict(replay="prioritized"), "replay"), (dict(td_loss="mse"), "td_loss")])
def test_sb3_rejects_what_it_cannot_express(kw, name):
    with pytest.raises(ValueError, match=name):
        sb3_reference.sb3_kwargs(dqn.make_args("CartPole-v1", **{"algo": "dqn", **kw}))


def test_train_sb3_dqn_tables_schedule_and_seeding():
    run = sb3_reference.train_sb3_dqn("CartPole-v1", seed=3, **TINY)
    assert run.evals["step"].tolist() == [500, 1000, 1500]  # the single-run trainer's evaluation schedule
    assert all(len(r) == TINY["eval_episodes"] for r in run.evals["eval/returns"])
    ep = run.episodes
    assert len(ep) > 5 and ep["step"].is_monotonic_increasing
    assert ep["charts/episodic_length"].sum() <= run.metrics["train/env_steps"]
    assert ep["charts/epsilon"].iloc[0] > ep["charts/epsilon"].iloc[-1] >= 0.04 - 1e-12
    # SB3 trains every train_freq steps after learning_starts, grad_steps each time, and stops at the first
    # multiple of train_freq at or past total_steps
    assert run.metrics["train/env_steps"] == 1500
    assert run.metrics["train/grad_steps"] == run.metrics["train/calls"] * TINY["grad_steps"] > 0
    assert run.config["algo"] == "dqn" and run.config["seed"] == 3
    again = sb3_reference.train_sb3_dqn("CartPole-v1", seed=3, **TINY)
    np.testing.assert_array_equal(again.evals["eval/return_mean"], run.evals["eval/return_mean"])
    assert again.episodes.equals(run.episodes)
    other = sb3_reference.train_sb3_dqn("CartPole-v1", seed=4, **TINY)
    assert not other.episodes.equals(run.episodes)


def test_run_grid_runs_the_reference_arm():
    cfg = grid.method_configs(2)
    assert cfg[grid.REFERENCE] == dict(algo="dqn", trainer="sb3") and cfg["DQN"] == dict(algo="dqn")
    out = grid.run_grid([dict(env_id="CartPole-v1", method=grid.REFERENCE, seeds=[1, 2], **cfg[grid.REFERENCE],
                              **TINY)], jobs=1, progress=False)
    assert set(out["metrics"]["method"]) == {grid.REFERENCE} and sorted(out["metrics"]["seed"]) == [1, 2]
    assert out["evals"].groupby("seed").size().tolist() == [3, 3]
    with pytest.raises(ValueError, match="algo"):  # an SB3 arm cannot be Double DQN
        grid.run_grid([dict(env_id="CartPole-v1", seeds=[1], trainer="sb3", algo="ddqn", **TINY)], jobs=1)
    with pytest.raises(ValueError, match="trainer"):
        grid.run_grid([dict(env_id="CartPole-v1", seeds=[1], trainer="rllib", **TINY)], jobs=1)
