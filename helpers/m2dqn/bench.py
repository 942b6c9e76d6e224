"""Throughput benchmarks for helpers.dqn (not tests): env steps per second beside a plain reference loop, and the
cost of one M2DQN update relative to one DDQN update, all measured in the same process, back to back.

Numbers are wall-clock on whatever machine runs them; on a shared machine, compare the ratios, not the absolutes.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
import torch

from helpers.core.timing import single_thread
from helpers.m2dqn import dqn, grid

__all__ = ["reference_loop_sps", "training_sps", "update_cost", "benchmark"]


def reference_loop_sps(env_id: str, steps: int, seed: int = 0) -> float:
    """Env steps per second of the plainest loop: ``env.step(random action)``, reset at episode end."""
    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    t = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    sps = steps / (time.perf_counter() - t)
    env.close()
    return sps


def training_sps(env_id: str, steps: int, seed: int = 0, **kwargs: Any) -> dict[str, float]:
    """``charts/SPS`` and ``time/update_ms`` of :func:`helpers.dqn.train_dqn` over ``steps`` env steps, learning from
    step ``steps // 5`` on (evaluation excluded from the SPS)."""
    kw = dict(total_steps=steps, learning_starts=steps // 5, eval_interval=steps, eval_episodes=1, seed=seed)
    kw.update(kwargs)
    return dqn.train_dqn(env_id, **kw).metrics


def update_cost(env_id: str = "CartPole-v1", *, num_batches: int = 4, batch_size: int | None = None,
                n_updates: int = 300, repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Wall time of one training call for each method of :func:`helpers.m2dqn.grid.method_configs`, on a full buffer.

    The methods are timed round-robin ``repeats`` times (``n_updates`` calls each) and the fastest round is kept,
    so load changes on a shared machine hit every method alike. Returns one row per method: ``method``,
    ``update_ms`` and ``ratio_to_ddqn``.
    """
    methods = grid.method_configs(num_batches, batch_size)
    env = gym.make(env_id)
    obs_dim, n_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    env.close()
    rng = np.random.default_rng(seed)
    rb = dqn.ReplayBuffer(10_000, obs_dim, seed=seed)
    for _ in range(10_000):
        o = rng.normal(size=obs_dim)
        rb.add(o, int(rng.integers(n_actions)), float(rng.normal()), o + 0.01, bool(rng.random() < 0.02))
    setups = {}
    for name, cfg in methods.items():
        _, _, kw = grid.resolve({"env_id": env_id, **cfg})
        args = dqn.make_args(env_id, seed=seed, **kw)
        torch.manual_seed(seed)
        q, t = dqn.QNetwork(obs_dim, n_actions, args.hidden), dqn.QNetwork(obs_dim, n_actions, args.hidden)
        opt = torch.optim.Adam(q.parameters(), lr=args.learning_rate, fused=True)
        setups[name] = (q, t, opt, args)
    best = {name: float("inf") for name in methods}
    with single_thread():  # as in training
        for _ in range(repeats):
            for name, (q, t, opt, args) in setups.items():
                for _ in range(5):  # warm-up
                    dqn.td_update(q, t, opt, rb.sample(args.batch_size, args.num_batches), args)
                start = time.perf_counter()
                for _ in range(n_updates):
                    for _ in range(args.grad_steps):
                        dqn.td_update(q, t, opt, rb.sample(args.batch_size, args.num_batches), args)
                best[name] = min(best[name], (time.perf_counter() - start) / n_updates)
    base = best["DDQN"]
    return pd.DataFrame([{"method": k, "update_ms": 1e3 * v, "ratio_to_ddqn": v / base} for k, v in best.items()])


def benchmark(env_id: str = "CartPole-v1", *, steps: int = 10_000, num_batches: int = 4, n_updates: int = 300,
              seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both benchmarks for one env. Returns ``(sps, updates)``:

    * ``sps``: rows ``loop`` (``random actions``, ``DDQN``, ``M2DQN``) with ``env_steps_per_s`` and
      ``ratio_to_reference``;
    * ``updates``: :func:`update_cost`.
    """
    ref = reference_loop_sps(env_id, steps, seed)
    rows = [{"loop": "random actions (reference)", "env_steps_per_s": ref}]
    for name, kw in (("DDQN", dict(algo="ddqn")), ("M2DQN", dict(algo="m2dqn", num_batches=num_batches))):
        sps_run = training_sps(env_id, steps, seed, **kw)["charts/SPS"]
        rows.append({"loop": f"{name} training", "env_steps_per_s": sps_run})
    sps = pd.DataFrame(rows)
    sps["ratio_to_reference"] = sps["env_steps_per_s"] / ref
    return sps, update_cost(env_id, num_batches=num_batches, n_updates=n_updates, seed=seed)
