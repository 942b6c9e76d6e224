"""The reference baseline of notebook 04: Stable-Baselines3's own DQN at rl-baselines3-zoo's settings, evaluated with
this project's protocol.

rl-baselines3-zoo tuned its `hyperparams/dqn.yml` for Stable-Baselines3's DQN, and its `benchmark.md` reports one
trained agent per env. To tell whether :mod:`helpers.m2dqn.dqn` is at the field's level, the notebook trains SB3's
DQN itself with the same settings (:data:`helpers.m2dqn.dqn.ENV_DEFAULTS`, which copies the zoo) on the same seeds
and scores it with the same greedy evaluation (:func:`helpers.m2dqn.dqn.evaluate`: ``eval_episodes`` episodes every
``eval_interval`` env steps and at the end, eval env reset with ``seed + EVAL_SEED_OFFSET + k``). The result is a
:class:`helpers.m2dqn.dqn.DQNRun` with the single-run trainer's tables, so the grid and the statistics treat it as one
more arm.

SB3's DQN is vanilla DQN (max target), Huber loss, Adam, ``max_grad_norm`` 10, target copied every
``target_update_interval`` env steps: what ``make_args(env_id, algo="dqn")`` describes. Arguments with no SB3
counterpart (M > 1, prioritized replay, the MSE loss, Double DQN) raise rather than being ignored.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from helpers.core.timing import single_thread
from helpers.m2dqn.dqn import EVAL_SEED_OFFSET, Args, DQNRun, evaluate, make_args

__all__ = ["sb3_kwargs", "train_sb3_dqn"]


def sb3_kwargs(args: Args) -> dict[str, Any]:
    """``stable_baselines3.DQN`` keyword arguments for ``args`` (as :func:`helpers.m2dqn.dqn.make_args` returns).

    Raises ValueError for an ``args`` that SB3's DQN cannot express: ``algo`` other than ``"dqn"``, ``num_batches``
    > 1, ``replay="prioritized"`` or ``td_loss="mse"``.
    """
    unsupported = {"algo": (args.algo, "dqn"), "num_batches": (args.num_batches, 1),
                   "replay": (args.replay, "uniform"), "td_loss": (args.td_loss, "huber")}
    for name, (got, need) in unsupported.items():
        if got != need:
            raise ValueError(f"Stable-Baselines3's DQN needs {name}={need!r}, got {got!r}")
    return dict(
        learning_rate=args.learning_rate, buffer_size=args.buffer_size, learning_starts=args.learning_starts,
        batch_size=args.batch_size, tau=1.0, gamma=args.gamma, train_freq=args.train_frequency,
        gradient_steps=args.grad_steps, target_update_interval=args.target_update_interval,
        exploration_fraction=args.exploration_fraction, exploration_initial_eps=args.start_e,
        exploration_final_eps=args.end_e,
        # SB3 reads max_grad_norm <= 0 literally (clip_grad_norm_ with 0 zeroes the gradient): no clip = infinity
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else float("inf"),
        policy_kwargs=dict(net_arch=[int(h) for h in args.hidden]), seed=args.seed, device="cpu", verbose=0,
    )


def train_sb3_dqn(env_id: str = "CartPole-v1", **kwargs: Any) -> DQNRun:
    """Train ``stable_baselines3.DQN`` on ``env_id`` with ``make_args(env_id, algo="dqn", **kwargs)``'s settings
    and return a :class:`helpers.m2dqn.dqn.DQNRun`: ``episodes`` (training episodes with exploration, from SB3's
    ``Monitor``), ``evals`` (greedy, the single-run trainer's schedule and seeds), empty ``losses``, ``metrics``
    (``charts/SPS`` over training without evaluation, ``time/*``, ``train/grad_steps``, ``eval/final_return``).

    SB3 collects ``train_freq`` env steps between training calls and stops at the first multiple past
    ``total_steps`` (CartPole-v1: 50,176 steps for 50k; ``train/env_steps`` has the count); its last evaluation is
    labelled ``total_steps``, as the single-run trainer's.
    """
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    kwargs.setdefault("algo", "dqn")
    args = make_args(env_id, **kwargs)
    sb3 = sb3_kwargs(args)
    episodes: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    eval_env = gym.make(env_id)
    eval_s = [0.0]

    def run_eval(model: Any, step: int) -> None:
        t = time.perf_counter()
        rets = evaluate(lambda o: int(model.predict(o, deterministic=True)[0]), eval_env, args.eval_episodes,
                        args.seed + EVAL_SEED_OFFSET)
        evals.append({"step": step, "eval/return_mean": float(np.mean(rets)), "eval/return_std": float(np.std(rets)),
                      "eval/returns": rets})
        eval_s[0] += time.perf_counter() - t

    class _Record(BaseCallback):
        """Training episodes from the Monitor's ``info["episode"]``; a greedy evaluation every ``eval_interval``."""

        def _on_step(self) -> bool:
            step = int(self.num_timesteps)
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes.append({"step": step, "episode": len(episodes),
                                     "charts/episodic_return": float(info["episode"]["r"]),
                                     "charts/episodic_length": int(info["episode"]["l"]),
                                     "charts/epsilon": float(self.model.exploration_rate)})
            if step % args.eval_interval == 0 and step != args.total_steps:
                run_eval(self.model, step)
            return True

    with single_thread():  # as the project's trainers: one intra-op thread per process
        model = DQN("MlpPolicy", gym.make(env_id), **sb3)
        t0 = time.perf_counter()
        model.learn(total_timesteps=args.total_steps, callback=_Record())
        train_s = time.perf_counter() - t0 - eval_s[0]
        run_eval(model, args.total_steps)
    eval_env.close()
    metrics = {"charts/SPS": model.num_timesteps / max(train_s, 1e-9), "time/train_s": train_s,
               "time/eval_s": eval_s[0], "time/update_ms": float("nan"),
               "train/calls": float(model._n_updates // max(args.grad_steps, 1)),
               "train/grad_steps": float(model._n_updates), "train/env_steps": float(model.num_timesteps),
               "eval/final_return": evals[-1]["eval/return_mean"]}
    return DQNRun(
        episodes=pd.DataFrame(episodes, columns=["step", "episode", "charts/episodic_return", "charts/episodic_length",
                                                 "charts/epsilon"]),
        evals=pd.DataFrame(evals, columns=["step", "eval/return_mean", "eval/return_std", "eval/returns"]),
        losses=pd.DataFrame(columns=["step"]), metrics=metrics, config=asdict(args))
